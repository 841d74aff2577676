"""The cost of indexing --n images (default 10^8), from per-item costs measured on this machine.

    python benchmarks/scale_plan.py [--n 100000000]

Reads the committed measurements (benchmarks/results/*.json: vs_rclip for the CPU encode rate,
query_latency for the text tower, fusion_latency for reranking k=50, scale_ondisk*.json for the
on-disk IVF index: the run with the most vectors), computes the rerank store's bytes per image
from the fusion config, measures the one cost none of them has (the Parquet bytes of an index row, on 100,000 rows with LAION-like
paths), and prints each
line of docs/scale.md's plan marked "measured", "extrapolated" (from a measurement, by a stated
rule) or "cited" (someone else's figure). Writes benchmarks/results/scale_plan.json.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from itm.indexer import store
from itm.indexer.ann import choose_factory
from itm.indexer.ivf_disk import TRAIN_PER_LIST, nlist_of

import benchlib

RESULTS = benchlib.RESULTS_DIR
EMB_BYTES = 512 * 4  # ViT-B-32's 512-d embedding, float32 in the segments
CLIP_RETRIEVAL_NODE_RATE = 7000  # images/s, ViT-B/32, one 8 x A100 node (clip-retrieval's README): cited


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def ondisk_runs() -> list[dict]:
    """The on-disk simulations (benchmarks/results/scale_ondisk*.json), fewest vectors first."""
    return sorted((json.loads(p.read_text()) for p in RESULTS.glob("scale_ondisk*.json")), key=lambda r: r["n"])


def scan_cost(run: dict, which: str = "warm") -> tuple[float, float]:
    """(ms per vector scanned, fixed ms): a line fitted to a run's p50 latency against nprobe x vectors per list."""
    x = [r["nprobe"] * run["n"] / nlist_of(run["factory"]) for r in run["search"]]
    per_vector, fixed = np.polyfit(x, [r[f"{which}_p50_ms"] for r in run["search"]], 1)
    return float(per_vector), float(fixed)


def image_store_bytes(config: str = "fusion-base") -> dict[str, int]:
    """Rerank-store bytes of one image, fp16 and int8 (store.quantize_int8), for the fusion config."""
    from itm.models.fusion import get_fusion_config

    cfg = get_fusion_config(config)
    one = np.zeros((1, cfg.n_levels, cfg.image_tokens, cfg.d_model), np.float16)
    q, scale = store.quantize_int8(one)
    return {"fp16": int(one.nbytes), "int8": int(q.nbytes + scale.nbytes)}


def row_bytes(n: int = 100_000) -> float:
    """Parquet bytes per row of the index's rows file (store.ROW_SCHEMA), LAION-like paths."""
    rng = np.random.default_rng(0)
    rows = {"id": np.arange(n), "kind": ["image"] * n, "source": [b"/data/laion400m"] * n,
            "path": [f"/data/laion400m/{i // 10_000:05d}/{i:09d}.jpg".encode() for i in range(n)],
            "text": [None] * n, "source_id": [None] * n, "size": rng.integers(5_000, 500_000, n),
            "mtime_ns": 1_700_000_000_000_000_000 + rng.integers(0, 10**15, n),
            "hash": [f"{h:032x}" for h in rng.integers(0, 2**62, n)],
            "segment": [f"seg-{i // 2048:016x}" for i in range(n)], "offset": np.arange(n) % 2048,
            # web images: sizes known, no EXIF date, camera or position
            "width": rng.integers(256, 1025, n), "height": rng.integers(256, 1025, n),
            **dict.fromkeys(("taken", "camera_make", "camera_model", "gps_lat", "gps_lon"), [None] * n)}
    buf = io.BytesIO()
    pq.write_table(pa.table(rows, schema=store.ROW_SCHEMA), buf)
    return buf.tell() / n


def plan(n: int, nprobe: int = 128) -> list[dict]:
    rclip = {r["work"]: r for r in load("vs_rclip")["rows"]}
    cpu_rate = rclip["build from scratch, 300 JPEGs 640x480"]["itm_rate"] / 2  # per core: the run used both
    q = {r["index"]: r for r in load("query_latency")["rows"]}
    fusion = {(r["query"], r["text_tokens"], r["k"]): r for r in load("fusion_latency")["rows"]}
    runs = ondisk_runs()
    disk = runs[-1] if runs else None  # the largest
    store_bytes = image_store_bytes()
    rows = row_bytes()
    out = []

    def line(what: str, value: str, how: str, basis: str) -> None:
        out.append({"what": what, "value": value, "how": how, "basis": basis})

    core_h = n / cpu_rate / 3600
    line("encode, CPU", f"{core_h:,.0f} core-hours = {core_h / 64:,.0f} h on 64 cores, {core_h / 64 / 24:,.1f} "
         "days on one 64-core machine", "extrapolated",
         f"{cpu_rate:.1f} img/s per core: itm build of 640x480 JPEGs, ONNX, 2-core EPYC (vs_rclip.json), "
         "x cores linearly (Ray actors share nothing)")
    line("encode, GPU", f"{n / CLIP_RETRIEVAL_NODE_RATE / 3600:,.1f} h on one 8xA100 node", "cited",
         f"clip-retrieval: {CLIP_RETRIEVAL_NODE_RATE} img/s ViT-B/32 per 8xA100 node; no GPU was lent here")
    lists = disk["lists_bytes_per_vector"] if disk else 512 + 8  # SQ8: a byte per dimension, and an 8-byte id
    per_item = {"embedding (float32)": EMB_BYTES, "rerank store fp16": store_bytes["fp16"],
                "rerank store int8": store_bytes["int8"], "IVF lists (SQ8 + id)": lists, "row (Parquet)": rows}
    how = {"embedding (float32)": "computed", "rerank store fp16": "computed", "rerank store int8": "computed",
           "IVF lists (SQ8 + id)": "measured" if disk else "computed", "row (Parquet)": "measured"}
    for what, b in per_item.items():
        line(f"bytes per image: {what}", f"{b:,.0f} B -> {b * n / 1e12:,.2f} TB", how[what], "")
    total16 = EMB_BYTES + store_bytes["fp16"] + lists + rows
    total8 = EMB_BYTES + store_bytes["int8"] + lists + rows
    line("disk, whole index", f"{total16 * n / 1e12:,.2f} TB (fp16 store), {total8 * n / 1e12:,.2f} TB (int8 store); "
         f"+{lists * n / 1e12:,.2f} TB of shard files while the IVF index is built", "extrapolated",
         "bytes per image x n")
    factory = choose_factory(n, 512)
    encode = q["text tower, padded (encode_texts)"]["p50_ms"]
    rerank = fusion[("text", 16, 50)]["median_ms"]
    rows_ram = n * rows * 2  # the rows table, read whole by a Snapshot (Arrow in memory ~ 2x Parquet)
    if disk is None:
        line("IVF build", f"{factory}: not measured (benchmarks/scale_ondisk.py has not run here)", "-", "")
        line("RAM for search", f"rows table {rows_ram / 1e9:,.1f} GB, read whole by a snapshot today; the "
             "coarse quantizer and the lists: not measured", "extrapolated", "rows: measured bytes x n x 2")
        line("query, text -> images, k=50 reranked", f"{encode:.0f} ms encode + {rerank:.0f} ms rerank + the IVF "
             "search, not measured", "measured in part", "encode and rerank: 1 thread, this machine")
        return out
    nlist, m_nlist = nlist_of(factory), nlist_of(disk["factory"])
    if "build_threads" in disk:  # a run whose build had the cores: its phases scale to n
        t, cores = disk["timings"], disk["build_threads"]
        train = t["train_s"] * (nlist / m_nlist) ** 2 * cores / 3600  # k-means: (TRAIN_PER_LIST x nlist) x nlist
        add = (t["add_s"] + t["merge_s"]) * n / disk["n"] * cores / 3600
        line("IVF build", f"{factory}: about {train + add:,.0f} core-hours (train {train:,.0f}, add and merge "
             f"{add:,.0f})", "extrapolated",
             f"the {disk['n']:,}-vector run on {cores} cores: train {t['train_s']:,.0f} s x (nlist {nlist:,} / "
             f"{m_nlist:,})^2 (k-means over {TRAIN_PER_LIST} vectors per list), add and merge "
             f"{t['add_s'] + t['merge_s']:,.0f} s x n / {disk['n']:,} (its add time includes generating the "
             "synthetic vectors)")
    else:
        line("IVF build", f"{factory}: not timed (the {disk['n']:,}-vector run's phases took "
             f"{disk['timings']['build_s']:,.0f} s of wall time while other jobs held the cores)", "-", "")
    quantizer = nlist * 512 * 4 * 1.2  # centroids, plus the HNSW graph over them
    line("RAM for search", f"{(quantizer + rows_ram) / 1e9:,.1f} GB: coarse quantizer {quantizer / 1e9:.2f} GB, "
         f"rows table {rows_ram / 1e9:,.1f} GB; lists and store from the page cache as far as it goes",
         "extrapolated", "the rows table is read whole today: the first thing to change at this size")
    # a warm IVF search costs a fixed part plus a scan proportional to the vectors in the probed lists; the
    # nprobe a recall target needs depends on the data (the simulation's clusters are not real embeddings'),
    # so the scan is costed at the nprobe given
    per_list = disk["n"] / m_nlist
    for run in runs:
        slope, base = scan_cost(run)
        line(f"IVF scan, {run['n']:,} vectors", f"{base:.2f} ms + {slope * 1e6:.0f} ns per vector scanned", "measured",
             f"{run['factory']}, warm p50 at nprobe {', '.join(str(r['nprobe']) for r in run['search'])}, 1 thread")
    (per_vector, fixed), (cold_per_vector, cold_fixed) = scan_cost(disk), scan_cost(disk, "cold")
    scanned = nprobe * n / nlist
    ivf_warm, ivf_cold = fixed + per_vector * scanned, cold_fixed + cold_per_vector * scanned
    line("query, text -> images, k=50 reranked", f"{encode + ivf_warm + rerank:,.0f} ms "
         f"({encode:.0f} encode + {ivf_warm:.0f} IVF + {rerank:.0f} rerank) at nprobe {nprobe}; lists dropped "
         f"from the page cache: {ivf_cold:.0f} ms IVF", "extrapolated",
         f"IVF: {fixed:.2f} ms + {per_vector * 1e6:.0f} ns per vector scanned (line fitted to the warm p50 at "
         f"nprobe {', '.join(str(r['nprobe']) for r in disk['search'])} on {disk['n']:,} vectors, {per_list:,.0f} "
         f"per list) x nprobe {nprobe} x {n / nlist:,.0f} vectors per list; the simulation chose nprobe "
         f"{disk['chosen_nprobe']} for its own clusters, real embeddings need their own measurement; encode and "
         "rerank measured (1 thread)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000_000)
    ap.add_argument("--nprobe", type=int, default=128, help="lists probed per query at --n (the 10^6 simulation "
                    "chose 128 for its recall plateau)")
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = ap.parse_args()
    lines = plan(args.n, args.nprobe)
    print(benchlib.format_table(lines, [("what", "what", "s"), ("value", "value", "s"), ("how", "how", "s")]))
    for ln in lines:
        if ln["basis"]:
            print(f"- {ln['what']}: {ln['basis']}")
    benchlib.write_json(args.out, {"n": args.n, "nprobe": args.nprobe, "lines": lines})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
