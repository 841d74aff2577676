"""Precisions against fp32 on this CPU: how close the embeddings are, and how fast each encodes.

    python benchmarks/precision.py [--models ViT-B-32,itm-tiny] [--pretrained random]
        [--batch-size 32] [--timed-batches 1] [--out benchmarks/results/precision.json]

For each model, the same seeded weights run four ways: torch in fp32 and in bf16 (`DualEncoder.load(...,
precision=)`), and the onnx backend's exported graphs in fp32 and in int8 (`--precision int8`:
ONNX Runtime's dynamic quantization of the matrix products). One batch of generated photo-like
images and one of captions go through each; the cosine between each item's embedding and torch
fp32's gives mean and min. That first batch is also the warm-up; then at least `--timed-batches`
batches of the same size (and at least 3 s of them) are timed for images/s and texts/s, and the
speed-up is against torch fp32 and against onnx fp32 (what a build runs by default).

bf16 is only fast where the CPU has bf16 arithmetic (AVX512-BF16 or AMX); int8's speed-up depends
on the CPU's 8-bit dot products (AVX512-VNNI, AVX-VNNI) as well. The JSON records whether torch's
oneDNN reports bf16 support here, and the CPU's flags for both.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from itm.models.cpu import cpu_flags as indexer_cpu_flags
from itm.models.encoder import DualEncoder
from itm.models.item_encoder import Runtime
from itm.models.loading import load_item_encoder
from itm.models.registry import resolve_model

import benchlib

IMAGE_SIDE = (320, 240)  # generated images; prepare() resizes them to the model's input size
MIN_SECONDS = 3.0  # small models repeat batches until this much time has passed


def cosines(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))  # (B,)
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "mean_1_minus_cos": float((1 - cos).mean())}


def cpu_flags(wanted: tuple[str, ...]) -> list[str]:
    """Which of `wanted` the CPU reports (Linux's /proc/cpuinfo; empty elsewhere)."""
    flags = indexer_cpu_flags() or frozenset()
    return [f for f in wanted if f in flags]


def per_second(fn, batch_items: int, min_batches: int, min_seconds: float = MIN_SECONDS) -> float:
    """Items/s over at least `min_batches` calls and at least `min_seconds`."""
    start = time.perf_counter()
    batches = 0
    while batches < min_batches or time.perf_counter() - start < min_seconds:
        fn()
        batches += 1
    return batches * batch_items / (time.perf_counter() - start)


VARIANTS = ("torch fp32", "torch bf16", "onnx fp32", "onnx int8")


def encoders(spec, fp32: DualEncoder, threads: int) -> dict[str, tuple]:
    """Per variant: (encode prepared pixels (B, 3, S, S) -> (B, E), encode texts -> (B, E)), as tensors.
    `fp32` is the model already loaded in torch fp32."""
    out = {}
    for precision, enc in (("fp32", fp32), ("bf16", DualEncoder.load(spec, precision="bf16"))):
        out[f"torch {precision}"] = (lambda x, e=enc: e.encode_images(x).embeddings,
                                     lambda t, e=enc: e.encode_texts(t).embeddings)
    for precision in ("fp32", "int8"):
        enc = load_item_encoder(spec, Runtime("onnx", precision=precision, threads=threads))
        out[f"onnx {precision}"] = (lambda x, e=enc: torch.from_numpy(e.encode_images(x.numpy()).emb),
                                    lambda t, e=enc: torch.from_numpy(e.encode_texts(t).emb))
    return out


def run_model(name: str, pretrained: str, batch_size: int, timed_batches: int) -> dict:
    spec = resolve_model(name, pretrained)
    first = DualEncoder.load(spec)
    variants = encoders(spec, first, torch.get_num_threads())
    images = [benchlib.photo_like(np.random.default_rng([7, i]), *IMAGE_SIDE) for i in range(batch_size)]
    pixels = torch.stack([first.prepare(im) for im in images])  # (B, 3, S, S)
    texts = benchlib.captions(batch_size, seed=7)
    out, rates = {}, {}
    for variant, (encode_images, encode_texts) in variants.items():
        start = time.perf_counter()
        image_emb = encode_images(pixels)  # warm-up, and the sample compared below
        first_call_s = time.perf_counter() - start
        out[variant] = (image_emb, encode_texts(texts))
        rates[variant] = {
            "images_per_s": per_second(lambda: encode_images(pixels), batch_size, timed_batches),
            "texts_per_s": per_second(lambda: encode_texts(texts), batch_size, timed_batches),
            "first_image_batch_s": first_call_s,
        }
    base = out["torch fp32"]
    return {
        "model": name, "pretrained": pretrained, "embed_dim": first.embed_dim, "image_size": first.image_size,
        "cosine_to_torch_fp32": {v: {"images": cosines(base[0], out[v][0]), "texts": cosines(base[1], out[v][1])}
                                 for v in VARIANTS[1:]},
        "rates": rates,
    }


def print_results(result: dict) -> None:
    print(benchlib.describe_machine(result["machine"]))
    print(f"torch CPU capability {result['cpu_capability']}, oneDNN bf16 supported: {result['mkldnn_bf16_supported']}, "
          f"CPU flags: {' '.join(result['cpu_flags']) or 'none of avx512_bf16 amx_bf16 avx512_vnni avx_vnni'}; "
          f"batch {result['settings']['batch_size']}, {result['settings']['threads']} threads, >= "
          f"{result['settings']['timed_batches']} timed batch(es) and >= {MIN_SECONDS:.0f} s after warm-up")
    print()
    rows = []
    for r in result["results"]:
        for kind in ("images", "texts"):
            rate = {v: r["rates"][v][f"{kind}_per_s"] for v in VARIANTS}
            for v in VARIANTS:
                cos = r["cosine_to_torch_fp32"].get(v, {}).get(kind, {})
                rows.append({"model": r["model"], "kind": kind, "variant": v, "per_s": rate[v],
                             "mean_cos": cos.get("mean_cos", 1.0), "min_cos": cos.get("min_cos", 1.0),
                             "vs_torch": rate[v] / rate["torch fp32"], "vs_onnx": rate[v] / rate["onnx fp32"]})
    print(benchlib.format_table(rows, [
        ("model", "model", "s"), ("kind", "kind", "s"), ("variant", "variant", "s"),
        ("mean_cos", "mean cos to torch fp32", ".5f"), ("min_cos", "min cos", ".5f"), ("per_s", "items/s", ".2f"),
        ("vs_torch", "x torch fp32", ".2f"), ("vs_onnx", "x onnx fp32", ".2f")]))


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
              "cpu_flags": cpu_flags(("avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni")),
              "settings": {"batch_size": args.batch_size, "timed_batches": args.timed_batches, "min_seconds": MIN_SECONDS,
                           "image_side": IMAGE_SIDE, "threads": torch.get_num_threads()},
              "results": results}
    print_results(result)
    benchlib.write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
