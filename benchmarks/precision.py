"""bf16 against fp32 on this CPU: how close the embeddings are, and how fast each precision encodes.

    python benchmarks/precision.py [--models ViT-B-32,itm-tiny] [--pretrained random]
        [--batch-size 32] [--timed-batches 1] [--out benchmarks/results/precision.json]

For each model, the same seeded weights are loaded at fp32 and at bf16 (`DualEncoder.load(...,
precision=)`). One batch of generated photo-like images and one of captions go through both; the
cosine between the two embeddings of each item gives mean and min. That first batch is also the
warm-up; then at least `--timed-batches` batches of the same size (and at least 3 s of them) are
timed for images/s and texts/s.

bf16 is only fast where the CPU has bf16 arithmetic (AVX512-BF16 or AMX); the JSON records
whether torch's oneDNN reports bf16 support here.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import benchlib
from indexer.encoder import DualEncoder
from indexer.models import resolve_model

IMAGE_SIDE = (320, 240)  # generated images; prepare() resizes them to the model's input size
MIN_SECONDS = 3.0  # small models repeat batches until this much time has passed


def cosines(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))  # (B,)
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "mean_1_minus_cos": float((1 - cos).mean())}


def per_second(fn, batch_items: int, min_batches: int, min_seconds: float = MIN_SECONDS) -> float:
    """Items/s over at least `min_batches` calls and at least `min_seconds`."""
    start = time.perf_counter()
    batches = 0
    while batches < min_batches or time.perf_counter() - start < min_seconds:
        fn()
        batches += 1
    return batches * batch_items / (time.perf_counter() - start)


def run_model(name: str, pretrained: str, batch_size: int, timed_batches: int) -> dict:
    spec = resolve_model(name, pretrained)
    encoders = {p: DualEncoder.load(spec, precision=p) for p in ("fp32", "bf16")}
    first = encoders["fp32"]
    images = [benchlib.photo_like(np.random.default_rng([7, i]), *IMAGE_SIDE) for i in range(batch_size)]
    pixels = torch.stack([first.prepare(im) for im in images])  # (B, 3, S, S)
    texts = benchlib.captions(batch_size, seed=7)
    out, rates = {}, {}
    for precision, enc in encoders.items():
        start = time.perf_counter()
        image_emb = enc.encode_images(pixels).embeddings  # warm-up, and the sample compared below
        first_call_s = time.perf_counter() - start
        text_emb = enc.encode_texts(texts).embeddings
        out[precision] = (image_emb, text_emb)
        rates[precision] = {
            "images_per_s": per_second(lambda: enc.encode_images(pixels), batch_size, timed_batches),
            "texts_per_s": per_second(lambda: enc.encode_texts(texts), batch_size, timed_batches),
            "first_image_batch_s": first_call_s,
        }
    return {
        "model": name, "pretrained": pretrained, "embed_dim": first.embed_dim, "image_size": first.image_size,
        "images": cosines(out["fp32"][0], out["bf16"][0]), "texts": cosines(out["fp32"][1], out["bf16"][1]),
        "rates": rates, "bf16_speedup_images": rates["bf16"]["images_per_s"] / rates["fp32"]["images_per_s"],
    }


def print_results(result: dict) -> None:
    print(benchlib.describe_machine(result["machine"]))
    print(f"torch CPU capability {result['cpu_capability']}, oneDNN bf16 supported: {result['mkldnn_bf16_supported']}; "
          f"batch {result['settings']['batch_size']}, >= {result['settings']['timed_batches']} timed batch(es) "
          f"and >= {MIN_SECONDS:.0f} s after warm-up")
    print()
    rows = []
    for r in result["results"]:
        for kind in ("images", "texts"):
            rows.append({"model": r["model"], "kind": kind, **r[kind],
                         "fp32_per_s": r["rates"]["fp32"][f"{kind}_per_s"],
                         "bf16_per_s": r["rates"]["bf16"][f"{kind}_per_s"]})
    for row in rows:
        row["speedup"] = row["bf16_per_s"] / row["fp32_per_s"]
    print(benchlib.format_table(rows, [
        ("model", "model", "s"), ("kind", "kind", "s"), ("mean_cos", "mean cos", ".5f"), ("min_cos", "min cos", ".5f"),
        ("fp32_per_s", "fp32 items/s", ".2f"), ("bf16_per_s", "bf16 items/s", ".2f"), ("speedup", "bf16/fp32", ".2f")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B-32,itm-tiny", help="comma-separated")
    parser.add_argument("--pretrained", default="random")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timed-batches", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads of the main thread (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = parser.parse_args()
    benchlib.set_torch_threads(args.torch_threads)
    facts = benchlib.machine_facts()
    results = [run_model(m, args.pretrained, args.batch_size, args.timed_batches) for m in args.models.split(",")]
    result = {"benchmark": "precision", "machine": benchlib.finish(facts),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
              "settings": {"batch_size": args.batch_size, "timed_batches": args.timed_batches, "min_seconds": MIN_SECONDS,
                           "image_side": IMAGE_SIDE},
              "results": results}
    print_results(result)
    benchlib.write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
