"""Query latency, split into text encoding and FAISS recall, on an index of 100k clustered vectors.

    python benchmarks/query_latency.py [--model ViT-B-32 --pretrained random] [--n 100000]
        [--queries 200] [--batch-queries 1024] [--k 10] [--coretypes Haswell,Prescott]
        [--torch-threads N] [--out benchmarks/results/query_latency.json]

- encode: `DualEncoder.encode_texts([query])`, one query at a time, after a warm-up; it runs the
  text tower on the tokens up to the query's end-of-text token only (the tower is causal and pools
  at that token, so the embedding is the same). A second row runs open_clip's own `encode_text` on
  the tokens padded to the full context length, to show what the cut saves; the largest deviation
  between the two embeddings is reported.
- recall: FAISS search for one query at a time (k results), for the index `choose_factory(n)`
  picks (HNSW32 at 100k, tuned as the library tunes it) and for Flat (exact), plus one batched
  search of `--batch-queries` further held-out queries (ms per query). faiss sends a Flat search
  through BLAS only when queries x dim >= 128000 (faiss's distance_compute_blas_threshold), so
  the batch must be large enough: 1024 x 512 is; the 200 single queries at once would not be.
- recall@k of the approximate index against Flat, on held-out queries from the same distribution.

The vectors are synthetic but shaped like real embeddings: unit vectors around a shared mean
direction, in clusters of Zipf-like sizes and varied spread. The FAISS timings are repeated in
child processes, one with the environment as given and one per OPENBLAS_CORETYPE value in
`--coretypes`, to show whether the OpenBLAS kernel choice matters on this CPU (the environment of
this process is never changed). Only the batched Flat search goes through BLAS.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from itm.indexer.ann import build_ann, choose_factory, tune

import benchlib

# torch and the encoder are imported where they are used, so that the FAISS-only child processes
# do not load torch's OpenMP runtime beside faiss's.

WARMUP = 5
ENCODE_ROW = "text tower, cut at EOT (encode_texts)"
BATCH_REPEATS = 3  # batched searches per index; the median is reported


def clustered_unit_vectors(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit vectors: a shared mean direction, Zipf-sized clusters of varied spread."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(dim).astype(np.float32)
    mean /= np.linalg.norm(mean)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    centers = 0.5 * mean + centers  # a shared direction: random pairs of items at cosine ~0.1, not 0
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    sizes = 1.0 / (np.arange(clusters) + 10.0) ** 0.8
    label = rng.choice(clusters, size=n, p=sizes / sizes.sum())
    spread = rng.uniform(0.7, 1.3, clusters).astype(np.float32)  # item-to-centre cosine ~0.6 to ~0.8
    x = rng.standard_normal((n, dim), dtype=np.float32) * (spread[label] / np.sqrt(dim))[:, None]
    x += centers[label]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def ms_stats(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"p50_ms": benchlib.percentile(ms, 50), "p95_ms": benchlib.percentile(ms, 95),
            "mean_ms": sum(ms) / len(ms)}


def time_each(fn, items) -> list[float]:
    for item in items[:WARMUP]:
        fn(item)
    out = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        out.append(time.perf_counter() - start)
    return out


def encode_full_context(encoder, text: str):
    """open_clip's own text forward on tokens padded to the full context length."""
    import torch

    with torch.inference_mode():
        ids = encoder.tokenizer([text]).to(encoder.device)  # (1, context_length)
        return encoder.model.encode_text(ids, normalize=True).float()  # (1, E)


def encode_rows(encoder, texts: list[str]) -> list[dict]:
    cut = time_each(lambda t: encoder.encode_texts([t]), texts)
    full = time_each(lambda t: encode_full_context(encoder, t), texts)
    deviation = max(float((encoder.encode_texts([t]).embeddings - encode_full_context(encoder, t)).abs().max())
                    for t in texts[:20])
    return [{"stage": "encode", "index": ENCODE_ROW, **ms_stats(cut)},
            {"stage": "encode", "index": "text tower, full context (open_clip encode_text)", **ms_stats(full),
             "max_abs_diff": deviation}]


def faiss_rows(indexes: dict[str, faiss.Index], queries: np.ndarray, batch: np.ndarray, k: int) -> list[dict]:
    rows = []
    for name, index in indexes.items():
        single = time_each(lambda i: index.search(queries[i:i + 1], k), list(range(len(queries))))
        index.search(batch[:WARMUP * 64], k)  # warm-up of the batched path (BLAS for Flat at d >= 400)
        batched = [benchlib.timed(lambda: index.search(batch, k))[0] / len(batch) * 1000 for _ in range(BATCH_REPEATS)]
        rows.append({"stage": "recall", "index": name, **ms_stats(single),
                     "batched_ms_per_query": statistics.median(batched), "batched_ms_per_query_runs": batched})
    return rows


def recall_at_k(approx: faiss.Index, exact: faiss.Index, queries: np.ndarray, k: int) -> float:
    _, truth = exact.search(queries, k)
    _, found = approx.search(queries, k)
    return sum(len(set(t) & set(f)) for t, f in zip(truth, found)) / truth.size


def child_main(folder: Path, k: int) -> None:
    """FAISS timings alone in this process, on indexes and queries written by the parent."""
    indexes = {}
    for path in sorted(folder.glob("*.faiss"), key=lambda p: p.stem == "Flat"):  # the parent's order
        indexes[path.stem] = faiss.read_index(str(path))
        tune(indexes[path.stem])
    rows = faiss_rows(indexes, np.load(folder / "queries.npy"), np.load(folder / "batch.npy"), k)
    print(json.dumps({"OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
                      "openblas_core": benchlib.openblas_core(), "rows": rows}))


def run_child(folder: Path, k: int, coretype: str | None) -> dict:
    env = dict(os.environ)
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    cmd = [sys.executable, __file__, "--faiss-child", str(folder), "--k", str(k)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_results(result: dict) -> None:
    print(benchlib.describe_machine(result["machine"]))
    s = result["settings"]
    print(f"{s['n']} vectors x {s['dim']} dims ({s['clusters']} clusters), {s['queries']} held-out queries one at a "
          f"time and {s['batch_queries']} in one batch, k={s['k']}; "
          f"{result['approx_factory']} recall@{s['k']} vs Flat = {result['recall_at_k']:.4f}; "
          f"build {result['build_s']['approx']:.1f} s ({result['approx_factory']}), {result['build_s']['Flat']:.2f} s (Flat)")
    print()
    cols = [("stage", "stage", "s"), ("index", "what", "s"), ("p50_ms", "p50 ms", ".3f"), ("p95_ms", "p95 ms", ".3f"),
            ("mean_ms", "mean ms", ".3f"), ("batched_ms_per_query", "batched ms/q", ".3f")]
    rows = result["rows"] + [{"stage": "total", "index": f"encode_texts + {result['approx_factory']}",
                              **result["total_ms"]}]
    print(benchlib.format_table(rows, cols))
    cut = next(r for r in result["rows"] if "max_abs_diff" in r)
    print(f"cut-at-EOT embeddings vs full-context ones: max |difference| {cut['max_abs_diff']:.2e} (unit vectors)")
    print()
    print("FAISS alone in a child process, OPENBLAS_CORETYPE as given vs set:")
    child_rows = [{**r, "env": f"{c['OPENBLAS_CORETYPE'] or '(unset)'} -> {c['openblas_core']}"}
                  for c in result["children"] for r in c["rows"]]
    print(benchlib.format_table(child_rows, [("env", "OPENBLAS_CORETYPE -> core", "s")] + cols[1:]))
    print(result["coretype_verdict"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="random")
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-queries", type=int, default=1024, help="held-out queries searched in one call")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--factory", default=None, help="approximate index (default: choose_factory(n))")
    parser.add_argument("--coretypes", default="Haswell,Prescott",
                        help="OPENBLAS_CORETYPE values for comparison children, comma-separated; '' skips them")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads of the main thread (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    parser.add_argument("--faiss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.faiss_child:
        return child_main(args.faiss_child, args.k)

    from itm.models.encoder import DualEncoder
    from itm.models.registry import resolve_model

    benchlib.set_torch_threads(args.torch_threads)
    facts = benchlib.machine_facts()
    encoder = DualEncoder.load(resolve_model(args.model, args.pretrained))
    dim = encoder.embed_dim
    vectors = clustered_unit_vectors(args.n + args.queries + args.batch_queries, dim, args.clusters)
    base, queries, batch = np.split(vectors, [args.n, args.n + args.queries])
    factory = args.factory or choose_factory(args.n)
    approx_s, (approx, _) = benchlib.timed(lambda: build_ann(base, factory))
    flat_s, (flat, _) = benchlib.timed(lambda: build_ann(base, "Flat"))
    recall = recall_at_k(approx, flat, queries, args.k)

    rows = encode_rows(encoder, benchlib.captions(args.queries)) + faiss_rows({factory: approx, "Flat": flat}, queries, batch, args.k)
    with tempfile.TemporaryDirectory(prefix="itm-bench-faiss-") as tmp:
        folder = Path(tmp)
        faiss.write_index(approx, str(folder / f"{factory}.faiss"))
        faiss.write_index(flat, str(folder / "Flat.faiss"))
        np.save(folder / "queries.npy", queries)
        np.save(folder / "batch.npy", batch)
        children = [run_child(folder, args.k, None)]
        children += [run_child(folder, args.k, c) for c in args.coretypes.split(",") if c]
    by = {r["index"]: r for r in rows}
    total = {key: by[ENCODE_ROW][key] + by[factory][key] for key in ("p50_ms", "p95_ms", "mean_ms")}
    result = {"benchmark": "query_latency", "machine": benchlib.finish(facts),
              "settings": {"model": args.model, "pretrained": args.pretrained, "n": args.n, "dim": dim,
                           "queries": args.queries, "batch_queries": args.batch_queries, "k": args.k,
                           "clusters": args.clusters, "torch_threads": args.torch_threads},
              "approx_factory": factory, "recall_at_k": recall, "build_s": {"approx": approx_s, "Flat": flat_s},
              "rows": rows, "total_ms": total, "children": children,
              "coretype_verdict": coretype_verdict(children)}
    print_results(result)
    benchlib.write_json(args.out, result)
    print(f"\nwrote {args.out}")


def coretype_verdict(children: list[dict]) -> str:
    """Batched Flat search (the BLAS path) under each OpenBLAS kernel, against the spread of its repeats."""
    if len(children) < 2:
        return "OPENBLAS_CORETYPE comparison skipped"
    flat = {f"{c['OPENBLAS_CORETYPE'] or '(unset)'} -> {c['openblas_core']}": r["batched_ms_per_query_runs"]
            for c in children for r in c["rows"] if r["index"] == "Flat"}
    base_name, base = next(iter(flat.items()))
    parts = []
    for name, runs in list(flat.items())[1:]:
        change = statistics.median(runs) / statistics.median(base) - 1
        overlap = min(runs) <= max(base) and min(base) <= max(runs)
        parts.append(f"{name}: {100 * change:+.0f}%" + (" (within the spread of repeats)" if overlap else ""))
    return f"batched Flat search, median ms/query against {base_name}: " + "; ".join(parts)


if __name__ == "__main__":
    main()
