"""An on-disk IVF index of many synthetic vectors, built as itm builds one, and its search latency cold and warm.

    python benchmarks/scale_ondisk.py --n 10000000          # 10^7 x 512-d: about 5 GB of lists, 10 GB free disk
    python benchmarks/scale_ondisk.py --n 200000 --dim 64   # a quick run

The vectors are unit vectors in clusters (as embeddings are; uniform random vectors on a sphere
have no neighbourhoods for an IVF index to find), generated block by block from a seed so that
they are never all in memory: the build (indexer/ivf_disk.py: train on a sample, add shard by
shard, merge_ondisk), the exact search that measures recall and the nprobe choice all stream
them. The factory is what itm chooses for the corpus size (indexer/ann.py: choose_factory).

The build runs on every core, as itm's does. Latency is per single query on one thread, from a
cold page cache (the lists file dropped from the cache with posix_fadvise before each query:
every list probed is read from disk) and from a warm one (the same queries again, after one pass). Writes benchmarks/results/scale_ondisk.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from itm.indexer import ivf_disk, store
from itm.indexer.ann import choose_factory, exact_neighbours, held_out_queries, recall_of

import benchlib

BLOCK = 1 << 20  # vectors generated (and added, as one shard) at a time


class Corpus:
    """n clustered unit vectors of `dim`, block i generated from seed (seed, i): the same on every pass."""

    def __init__(self, n: int, dim: int, clusters: int, spread: float, seed: int):
        self.n, self.dim, self.spread, self.seed = n, dim, spread, seed
        self.centres = np.random.default_rng(seed).standard_normal((clusters, dim)).astype(np.float32)
        self.passes = 0

    def block(self, i: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, i))
        m = min(BLOCK, self.n - i * BLOCK)
        x = self.centres[rng.integers(0, len(self.centres), m)]
        x += self.spread * rng.standard_normal((m, self.dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def blocks(self):
        self.passes += 1
        return (self.block(i) for i in range((self.n + BLOCK - 1) // BLOCK))

    def sample(self, m: int, seed: int) -> np.ndarray:
        """m vectors of the corpus, drawn from its blocks in proportion."""
        rng = np.random.default_rng(seed)
        out = []
        nblocks = (self.n + BLOCK - 1) // BLOCK
        for i in range(nblocks):
            b = self.block(i)
            out.append(b[rng.choice(len(b), size=min(len(b), -(-m * len(b) // self.n)), replace=False)])
        return rng.permutation(np.concatenate(out))[:m]


def drop_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_latencies(index: faiss.Index, queries: np.ndarray, k: int) -> list[float]:
    out = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], k)
        out.append(1e3 * (time.perf_counter() - t))
    return out


def cold_latencies(path: Path, nprobe: int, queries: np.ndarray, k: int) -> list[float]:
    """Each query on a freshly opened index whose lists file was dropped from the page cache first.

    Pages a process maps stay in the cache whatever posix_fadvise says: the index is closed (its
    map undone) before the drop, and opened again after it (the open is not timed).
    """
    lists = path.with_suffix(".ivfdata")
    out = []
    for q in queries:
        drop_from_cache(lists)
        index = ivf_disk.open_on_disk(path, nprobe)
        t = time.perf_counter()
        index.search(q[None], k)
        out.append(1e3 * (time.perf_counter() - t))
        del index
    return out


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": benchlib.percentile(ms, 50), "p95_ms": benchlib.percentile(ms, 95),
            "mean_ms": float(np.mean(ms))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=20_000)
    ap.add_argument("--spread", type=float, default=0.5, help="noise per dimension around a cluster centre (whose "
                    "coordinates have unit variance)")
    ap.add_argument("--factory", help="default: itm's choice for --n (itm.indexer.ann.choose_factory)")
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--cold-queries", type=int, default=40, help="queries timed from a cold page cache")
    ap.add_argument("--work", type=Path, default=Path("/tmp/itm-scale-ondisk"), help="where the index is written")
    ap.add_argument("--keep", action="store_true", help="keep the index files afterwards")
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = ap.parse_args()
    facts = benchlib.machine_facts()
    build_threads = faiss.omp_get_max_threads()  # the build uses every core, as itm's does
    factory = args.factory or choose_factory(args.n, args.dim, args.recall_target)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    corpus = Corpus(args.n, args.dim, args.clusters, args.spread, seed=0)
    ivf_disk.SHARD_ROWS = BLOCK
    timings = {}
    t = time.perf_counter()
    sample = corpus.sample(ivf_disk.train_size(factory, args.n), seed=1)
    timings["sample_s"] = time.perf_counter() - t
    t = time.perf_counter()
    built = ivf_disk.build_on_disk(corpus.blocks, sample, factory, args.work / "ann.faiss", args.recall_target)
    timings["build_s"] = time.perf_counter() - t  # train, add, merge, recall and nprobe choice
    timings |= {f"{k}_s": v for k, v in built.seconds.items()}  # generation of the blocks included in add and tune
    store.write_ann(args.work / "ann.faiss", built.index)
    files = {p.name: p.stat().st_size for p in args.work.iterdir()}
    nprobe_chosen, build_recall = built.nprobe, built.recall_at_10
    del built  # the build's own index object: what a search process opens is measured below
    faiss.omp_set_num_threads(1)  # latency of one query on one thread
    rss = {"before_open": benchlib.rss_bytes()}
    index = ivf_disk.open_on_disk(args.work / "ann.faiss", nprobe_chosen)
    rss["after_open"] = benchlib.rss_bytes()
    queries = held_out_queries(corpus.sample(args.queries, seed=2), corpus.blocks, 3)  # not the build's queries
    truth = exact_neighbours(queries, corpus.blocks, 10)
    rows = []
    ivf = faiss.extract_index_ivf(index)
    for nprobe in sorted({max(1, nprobe_chosen // 2), nprobe_chosen, 2 * nprobe_chosen} & set(range(1, ivf.nlist + 1))):
        ivf.nprobe = nprobe
        recall = recall_of(index, queries, truth)
        cold = cold_latencies(args.work / "ann.faiss", nprobe, queries[:args.cold_queries], 10)
        warm_latencies(index, queries, 10)  # one pass to warm the cache
        warm = warm_latencies(index, queries, 10)
        rows.append({"nprobe": nprobe, "recall_at_10": recall, **{f"cold_{k}": v for k, v in summary(cold).items()},
                     **{f"warm_{k}": v for k, v in summary(warm).items()}})
    rss["after_searches"] = benchlib.rss_bytes()  # touched pages of the mapped lists count here too
    print(benchlib.format_table(rows, [("nprobe", "nprobe", "d"), ("recall_at_10", "recall@10", ".3f"),
                                       ("cold_p50_ms", "cold p50 ms", ".1f"), ("cold_p95_ms", "cold p95 ms", ".1f"),
                                       ("warm_p50_ms", "warm p50 ms", ".2f"), ("warm_p95_ms", "warm p95 ms", ".2f")]))
    result = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "spread": args.spread, "factory": factory,
              "recall_target": args.recall_target, "chosen_nprobe": nprobe_chosen,
              "build_recall_at_10": build_recall, "files_bytes": files,
              "lists_bytes_per_vector": files["ann.ivfdata"] / args.n, "timings": timings,
              "build_s_per_million": timings["build_s"] / (args.n / 1e6), "generation_passes": corpus.passes,
              "rss_bytes": rss, "search": rows, "threads": 1, "build_threads": build_threads,
              "machine": benchlib.finish(facts)}
    print(f"{factory}: {args.n:,} x {args.dim}, lists {files['ann.ivfdata'] / 2**30:.2f} GiB "
          f"({result['lists_bytes_per_vector']:.0f} B/vector), index file {files['ann.faiss'] / 2**20:.1f} MiB; "
          f"build {timings['build_s']:.0f} s ({result['build_s_per_million']:.0f} s per million, "
          f"{corpus.passes} generation passes included), nprobe {nprobe_chosen} for {args.recall_target}")
    benchlib.write_json(args.out, result)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
