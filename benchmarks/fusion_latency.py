"""Fusion reranker latency on this machine: one query against k candidates, one batched forward pass.

    python benchmarks/fusion_latency.py [--config fusion-base] [--threads N] [--out benchmarks/results/fusion_latency.json]

Random weights and random fp16 store features: latency depends only on shapes, so each row
fixes the real length of every text (the full max_text_tokens: the worst case; 16: a typical
caption). Per row: wall-clock min and median over repeats after warm-up, and the median CPU time
of the process per call. On a machine shared with other work, wall time swells with the load;
with --threads 1 the CPU time is what one uncontended core would take. Writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from itm.models.fusion import FusionReranker, bytes_per_image, bytes_per_text, get_fusion_config

WARMUP = 3


def time_rerank(model: FusionReranker, k: int, query: str, text_len: int, repeats: int) -> dict[str, float]:
    cfg = model.cfg
    images = torch.randn(1 if query == "image" else k, cfg.n_levels, cfg.image_tokens, cfg.d_model).half()
    texts = torch.randn(1 if query == "text" else k, cfg.n_levels, cfg.max_text_tokens, cfg.d_model).half()
    mask = (torch.arange(cfg.max_text_tokens) < text_len).expand(texts.shape[0], -1)  # (B, Tt)
    wall, cpu = [], []
    with torch.inference_mode():
        for i in range(repeats + WARMUP):
            w, c = time.perf_counter(), time.process_time()
            model(images, texts, mask)
            if i >= WARMUP:
                wall.append((time.perf_counter() - w) * 1000)
                cpu.append((time.process_time() - c) * 1000)
    return {"min_ms": min(wall), "median_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="fusion-base")
    parser.add_argument("--ks", default="10,50,100")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fusion_latency.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_fusion_config(args.config)
    model = FusionReranker(cfg).eval()
    rows = [{"query": query, "text_tokens": text_len, "k": k, **time_rerank(model, k, query, text_len, args.repeats)}
            for query in ("text", "image") for text_len in (cfg.max_text_tokens, 16)
            for k in map(int, args.ks.split(","))]
    print(f"{cfg.name}: {bytes_per_image(cfg)} B/image, {bytes_per_text(cfg)} B/text, "
          f"{torch.get_num_threads()} threads")
    print(f"{'query':>6} {'text tokens':>12} {'k':>5} {'min ms':>7} {'median ms':>10} {'cpu ms':>7}")
    for r in rows:
        print(f"{r['query']:>6} {r['text_tokens']:>12} {r['k']:>5} {r['min_ms']:>7.1f} "
              f"{r['median_ms']:>10.1f} {r['cpu_ms']:>7.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"config": cfg.to_dict(), "threads": torch.get_num_threads(), "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
