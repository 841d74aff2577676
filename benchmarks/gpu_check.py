"""The GPU figures of issue 12, in one prepared run for a machine with a GPU (and faiss-gpu: pip install -e '.[gpu]').

    python benchmarks/gpu_check.py                          # on the GPU machine: cuda, fp16, full sizes
    python benchmarks/gpu_check.py --device cpu --precision fp32 --smoke   # the same code, tiny, on a CPU

1. ViT-B-32 (random weights) image tower at --precision: the model-only rate (prepared pixels
   already on the host, in batches) and a whole build's rate (itm-index build --device: JPEG
   decoding in --workers threads, encoding, segments, commit) on generated 640x480 JPEGs.
2. faiss on --n clustered 512-d unit vectors: exact (Flat) and IVF (nprobe 32) on the GPU
   when faiss-gpu sees one (itm.indexer.ann.to_gpu_if_available), one query at a time and in a
   batch of 1,024, with IVF's recall@10 against exact search.
3. The fusion reranker (fusion-base, random weights) scoring k=50 candidates for one text
   query on --device, fp16 store features in, as itm-search reranks.

Writes benchmarks/results/gpu_check.json (the device's name and the library versions included).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from itm.indexer.ann import to_gpu_if_available
from itm.indexer.build import BuildOptions, build_index
from itm.models.encoder import DualEncoder
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.models.fusion_scorer import TorchFusion
from itm.models.registry import resolve_model

import benchlib


def model_rate(spec, device: str, precision: str, batch: int, batches: int) -> float:
    dual = DualEncoder.load(spec, device, precision)
    pixels = torch.randn(batch, 3, dual.image_size, dual.image_size)
    dual.encode_images(pixels)  # warm-up: kernels chosen, memory reserved
    sync(device)
    t = time.perf_counter()
    for _ in range(batches):
        dual.encode_images(pixels).embeddings.cpu()
    sync(device)
    return batch * batches / (time.perf_counter() - t)


def build_rate(spec, device: str, precision: str, n: int, batch: int, workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            benchlib.photo_like(rng, 640, 480).save(folder / f"{i:06d}.jpg", quality=90)
        opts = BuildOptions(batch_size=batch, workers=workers, device=device, precision=precision, backend="torch")
        r = build_index(folder, Path(tmp) / "idx", spec, opts)
    embed = r.timings.embed_s - r.timings.model_load_s
    return {"items": n, "seconds": r.seconds, "model_load_s": r.timings.model_load_s,
            "embed_items_per_s": n / embed, "e2e_items_per_s": n / r.seconds}


def faiss_rows(n: int, dim: int = 512) -> list[dict]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(10, n // 1000), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n + 1024)] + 0.5 * rng.standard_normal((n + 1024, dim), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    base, queries = x[:n], x[n:]
    exact = faiss.IndexFlatIP(dim)
    exact.add(base)
    _, truth = exact.search(queries, 10)
    ivf = faiss.index_factory(dim, f"IVF{max(16, int(4 * np.sqrt(n)) // 16 * 16)},Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(base[:max(20_000, 40 * faiss.extract_index_ivf(ivf).nlist)])
    ivf.add(base)
    faiss.extract_index_ivf(ivf).nprobe = 32
    rows = []
    for name, index in (("Flat", exact), ("IVF nprobe 32", ivf)):
        placed = to_gpu_if_available(index)
        on_gpu = placed is not index
        single = []
        for q in queries[:200]:
            t = time.perf_counter()
            placed.search(q[None], 10)
            single.append(1e3 * (time.perf_counter() - t))
        t = time.perf_counter()
        _, found = placed.search(queries, 10)
        batch_ms = 1e3 * (time.perf_counter() - t) / len(queries)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found)]))
        rows.append({"index": name, "n": n, "on_gpu": on_gpu, "single_p50_ms": statistics.median(single),
                     "single_p95_ms": benchlib.percentile(single, 95), "batch_ms_per_query": batch_ms,
                     "recall_at_10": recall})
    return rows


def rerank_ms(device: str, k: int = 50, repeats: int = 30) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = get_fusion_config("fusion-base")
    scorer = TorchFusion(FusionReranker(cfg).eval().to(device))
    cand = np.random.default_rng(0).standard_normal((k, cfg.n_levels, cfg.image_tokens, cfg.d_model)).astype(np.float16)
    text = np.random.default_rng(1).standard_normal((1, cfg.n_levels, cfg.max_text_tokens, cfg.d_model))
    mask = np.arange(cfg.max_text_tokens)[None] < 16
    out = []
    for i in range(repeats + 3):
        t = time.perf_counter()
        scorer.logits(cand, text.astype(np.float16), mask)  # the logits come back to the host: synchronised
        if i >= 3:
            out.append(1e3 * (time.perf_counter() - t))
    return {"k": k, "median_ms": statistics.median(out), "min_ms": min(out)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check that the script runs")
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = ap.parse_args()
    facts = benchlib.machine_facts()
    if args.device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(0)
    facts["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    spec = resolve_model("itm-tiny" if args.smoke else "ViT-B-32", "random")
    batch, n_build, n_faiss = (8, 16, 20_000) if args.smoke else (256, 4096, 1_000_000)
    result = {"device": args.device, "precision": args.precision, "model": spec.arch,
              "model_items_per_s": model_rate(spec, args.device, args.precision, batch, 2 if args.smoke else 20),
              "build": build_rate(spec, args.device, args.precision, n_build, batch, 2 if args.smoke else 16),
              "faiss": faiss_rows(n_faiss), "rerank": rerank_ms(args.device)}
    result["build"]["ratio_to_model"] = result["build"]["embed_items_per_s"] / result["model_items_per_s"]
    print(f"{spec.arch} {args.precision} on {args.device}: model {result['model_items_per_s']:.0f} img/s, build "
          f"{result['build']['embed_items_per_s']:.0f} img/s ({result['build']['ratio_to_model']:.2f} of it)")
    print(benchlib.format_table(result["faiss"], [("index", "index", "s"), ("n", "vectors", "d"),
                                                  ("on_gpu", "GPU", ""), ("single_p50_ms", "p50 ms", ".3f"),
                                                  ("batch_ms_per_query", "batched ms/query", ".4f"),
                                                  ("recall_at_10", "recall@10", ".3f")]))
    print(f"rerank k=50 on {args.device}: {result['rerank']['median_ms']:.2f} ms median")
    result["machine"] = benchlib.finish(facts)
    benchlib.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
