"""Query latency from the shell with and without a warm server, in-process, and a bounded load test.

    python benchmarks/serve_load.py [--n-large 100000] [--cold-runs 10] [--warm-runs 30] [--inprocess-runs 100]
        [--clients 50] [--seconds 30] [--work DIR] [--out benchmarks/results/serve_load.json]

Two indexes, both with the bundled demo model (dual encoders and fusion reranker):

- samples: data/samples (300 images, 300 captions), built with `itm-index build --model demo`.
- large: `--n-large` images (100,000 by default) and the 300 captions, written through the
  library's commit path (itm.indexer.commit.Writer: segments, rows, then a commit that builds the
  FAISS index the library picks for the size, HNSW32 at 100k, and measures its recall): each
  synthetic image is a hard link to one of the 300 sample images (so thumbnails and image queries
  work), with that image's rerank-store features and its embedding moved by Gaussian noise
  (sigma 0.02 per dimension, then renormalised), so that neighbours are not exact copies.

For each index, with the queries cycling through the sample captions:

- cold CLI: `itm-search QUERY --index DIR --no-server` in a fresh process (the models load each time).
- warm CLI: `itm-search QUERY --index DIR` while `itm-serve --index DIR` runs (found through its
  announcement), end to end: process start, the HTTP query, the printed hits.
- in-process: `Searcher.search` in this process after a warm-up.
- and once, `itm-search --help`: the command's start-up alone (Python, its imports, typer), which a
  warm query from the shell pays too.
- load: `--clients` threads of this process, each sending POST /api/search back to back on its own
  keep-alive connection to the loopback server for `--seconds` (four text queries in five, one
  image query by row id "more like this"). The server admits a bounded number of queries at once
  and answers the rest 503 with Retry-After at once; a turned-away client tries again after
  10-100 ms. Reported: admitted queries per second and their p50/p95/p99, against the p95 of the
  same queries sent one at a time just before (unloaded) and just after (normal service right
  after); the 503s apart from errors; the server's resident memory before and after (VmRSS) and at
  peak (VmHWM).

The client threads share the machine's cores with the server, as a web page's users would not;
on 2 cores the figures are a floor. Timings need a quiet machine: the JSON records the load
average at the start and the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
import pyarrow as pa

from itm.common.options import SEGMENT_ROWS
from itm.indexer import store
from itm.indexer.commit import Writer, locked
from itm.retrieval.discovery import find_server

import benchlib

SAMPLES = ROOT / "data" / "samples"
NOISE = 0.02  # per-dimension sigma of the noise that moves a synthetic image's embedding from its source's
ENV = dict(os.environ)


def command(name: str, module: str) -> list[str]:
    exe = shutil.which(name)
    return [exe] if exe else [sys.executable, "-c", f"import {module} as m; m.main()"]


def build_samples(index: Path) -> None:
    for source in (SAMPLES / "images", SAMPLES / "captions.txt"):
        subprocess.run(command("itm-index", "itm.indexer.cli") + ["build", str(source), "--index", str(index), "--model",
                       "demo", "-q"], check=True, env=ENV, capture_output=True)


def synthesize(samples: Path, index: Path, n: int, links: Path, seed: int = 0) -> None:
    """An index of `n` images and the samples' texts, written through the commit path (see the docstring)."""
    rng = np.random.default_rng(seed)
    snap = store.Snapshot.open(samples)
    m = snap.manifest
    image_rows, text_rows = snap.kind_rows("image"), snap.kind_rows("text")
    meta = snap.rows.take(image_rows).to_pylist()
    emb, tok = snap.gather(image_rows, "emb"), snap.gather(image_rows, "tok")
    links.mkdir(parents=True)
    index.mkdir(parents=True)
    rows: list[dict] = []
    with locked(index):
        w = Writer(index)
        w.start(m.model, dataclasses.replace(m.reranker, source=str(samples / m.reranker.file)))
        for start in range(0, n, SEGMENT_ROWS):
            src = np.arange(start, min(n, start + SEGMENT_ROWS)) % len(meta)
            part = []
            for i, s in zip(range(start, start + len(src)), src):
                path = links / f"{i // 1000:03d}" / f"{i:06d}.png"
                path.parent.mkdir(exist_ok=True)
                os.link(os.fsdecode(meta[s]["path"]), path)
                part.append({**{k: meta[s][k] for k in ("kind", "size", "mtime_ns", "hash")},
                             "source": os.fsencode(links), "path": os.fsencode(path), "text": None, "source_id": None})
            moved = emb[src] + rng.normal(0, NOISE, emb[src].shape).astype(np.float32)
            moved /= np.linalg.norm(moved, axis=1, keepdims=True)
            segment = w.write_segment(part, moved, tok[src])
            rows += [{**r, "segment": segment, "offset": j} for j, r in enumerate(part)]
        texts = snap.rows.take(text_rows).to_pylist()
        segment = w.write_segment([{k: t[k] for k in store.SEGMENT_SCHEMA.names} for t in texts],
                                  snap.gather(text_rows, "emb"), snap.gather(text_rows, "tok"),
                                  snap.gather(text_rows, "mask"))
        rows += [{**{k: t[k] for k in store.SEGMENT_SCHEMA.names}, "segment": segment, "offset": j}
                 for j, t in enumerate(texts)]
        table = pa.Table.from_pylist([{"id": i, **r} for i, r in enumerate(rows)], schema=store.ROW_SCHEMA)
        w.commit(table, store.SKIP_SCHEMA.empty_table(), next_id=len(rows))


def stats(seconds: list[float]) -> dict:
    ms = [1e3 * s for s in seconds]
    return {"runs": len(ms), "median_ms": benchlib.percentile(ms, 50), "p95_ms": benchlib.percentile(ms, 95),
            "min_ms": min(ms), "max_ms": max(ms)}


def cli_runs(index: Path, queries: list[str], runs: int, *extra: str) -> tuple[list[float], list[bytes]]:
    times, outputs = [], []
    for i in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(command("itm-search", "itm.retrieval.cli") + [queries[i % len(queries)], "--index", str(index),
                           "--json", *extra], capture_output=True, env=ENV)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(f"itm-search failed: {r.stderr.decode(errors='replace')}")
        outputs.append(r.stdout)
    return times, outputs


def startup_runs(runs: int) -> list[float]:
    """`itm-search --help`: the process's start-up alone, what no server can save."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(command("itm-search", "itm.retrieval.cli") + ["--help"], capture_output=True, env=ENV, check=True)
        times.append(time.perf_counter() - t0)
    return times


def in_process(index: Path, queries: list[str], runs: int) -> list[float]:
    from itm.retrieval.search import Searcher

    s = Searcher(index)
    for q in queries[:5]:
        s.search(text=q)
    return [benchlib.timed(lambda: s.search(text=queries[i % len(queries)]))[0] for i in range(runs)]


def start_server(index: Path) -> subprocess.Popen:
    return benchlib.start_server(command("itm-serve", "itm.retrieval.serve_cli"), index, ENV)


def memory_mb(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def post(conn: http.client.HTTPConnection, body: dict) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one POST /api/search on a keep-alive connection."""
    t0 = time.perf_counter()
    conn.request("POST", "/api/search", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    return r.status, data, time.perf_counter() - t0


def sequential(url: str, queries: list[str], runs: int) -> dict:
    """One client, one query after another: the unloaded latency (and, after a load, whether service is normal)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    results = [post(conn, {"text": queries[i % len(queries)]}) for i in range(runs)]
    conn.close()
    return {"ok": sum(r[0] == 200 for r in results), **stats([r[2] for r in results])}


def load_test(url: str, queries: list[str], image_ids: list[int], clients: int, seconds: float) -> dict:
    """`clients` threads sending queries back to back for `seconds`; a 503 (turned away) is counted apart from
    errors, and its client tries again after 10-100 ms (sooner than the Retry-After it gets, to keep the pressure)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    latencies: list[float] = []
    errors: list[str] = []
    shed = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        rng = random.Random(n)
        i = n
        while time.monotonic() < stop:
            body = {"image_id": image_ids[i % len(image_ids)], "kind": "all"} if i % 5 == 4 else \
                {"text": queries[i % len(queries)]}
            i += clients
            try:
                status, data, elapsed = post(conn, body)
                ok = status == 200 and json.loads(data)["hits"]
            except (OSError, http.client.HTTPException, ValueError) as e:
                status, ok, data = 0, False, repr(e).encode()
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
            with lock:
                if ok:
                    latencies.append(elapsed)
                elif status == 503:
                    shed[0] += 1
                else:
                    errors.append(f"{status} {data[:200].decode(errors='replace')}")
            if status == 503:
                time.sleep(rng.uniform(0.01, 0.1))
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = [1e3 * s for s in latencies]
    return {"clients": clients, "seconds": wall, "queries": len(ms), "shed_503": shed[0], "qps": len(ms) / wall,
            "p50_ms": benchlib.percentile(ms, 50), "p95_ms": benchlib.percentile(ms, 95),
            "p99_ms": benchlib.percentile(ms, 99), "errors": len(errors), "first_errors": errors[:3]}


def measure(name: str, index: Path, args, queries: list[str]) -> tuple[list[dict], dict]:
    items = sum(store.Snapshot.open(index).manifest.counts.values())
    print(f"{name}: cold CLI x{args.cold_runs}", file=sys.stderr)
    cold, cold_out = cli_runs(index, queries, args.cold_runs, "--no-server")
    proc = start_server(index)
    try:
        server_pid = proc.pid
        found = find_server(index)
        print(f"{name}: warm CLI x{args.warm_runs}", file=sys.stderr)
        cli_runs(index, queries, 3)  # the server's first queries (thumbnail-free; warms its caches)
        warm, warm_out = cli_runs(index, queries, args.warm_runs)
        same = all(w == c for w, c in zip(warm_out, cold_out))  # same query order: the first cold runs
        before = memory_mb(server_pid)
        image_ids = [h["id"] for h in (json.loads(line) for line in warm_out[0].splitlines())]
        unloaded = sequential(found.url, queries, args.warm_runs)
        print(f"{name}: load, {args.clients} clients x {args.seconds}s", file=sys.stderr)
        load = load_test(found.url, queries, image_ids, args.clients, args.seconds)
        after = memory_mb(server_pid)
        right_after = sequential(found.url, queries, args.warm_runs)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"{name}: in-process x{args.inprocess_runs}", file=sys.stderr)
    inproc = in_process(index, queries, args.inprocess_runs)
    rows = [{"index": name, "items": items, "path": path, **stats(t)} for path, t in
            (("cold CLI (--no-server)", cold), ("warm CLI (itm-serve running)", warm), ("in-process Searcher", inproc))]
    load.update(index=name, items=items, rss_before_mb=before["VmRSS"], rss_after_mb=after["VmRSS"],
                rss_peak_mb=after["VmHWM"], cli_output_identical=same, unloaded_p95_ms=unloaded["p95_ms"],
                p95_vs_unloaded=load["p95_ms"] / unloaded["p95_ms"], after_ok=right_after["ok"],
                after_runs=right_after["runs"], after_p95_ms=right_after["p95_ms"])
    return rows, load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-large", type=int, default=100_000)
    ap.add_argument("--cold-runs", type=int, default=10)
    ap.add_argument("--warm-runs", type=int, default=30)
    ap.add_argument("--inprocess-runs", type=int, default=100)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--work", type=Path, default=None, help="Folder for the indexes (default: a temporary one).")
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = ap.parse_args()
    facts = benchlib.machine_facts()
    queries = [line for line in (SAMPLES / "captions.txt").read_text().splitlines() if line][:50]
    with tempfile.TemporaryDirectory(prefix="itm-serve-load-") as tmp:
        work = args.work or Path(tmp)
        samples, large = work / "samples", work / "large"
        if not (samples / "manifest.json").exists():
            build_samples(samples)
        t0 = time.perf_counter()
        if not (large / "manifest.json").exists():
            print(f"synthesizing {args.n_large} images", file=sys.stderr)
            synthesize(samples, large, args.n_large, work / "large-links")
        synth_s = time.perf_counter() - t0
        rows, loads = [{"index": "-", "items": 0, "path": "itm-search --help (start-up only)",
                        **stats(startup_runs(args.warm_runs))}], []
        for name, index in (("samples", samples), ("large", large)):
            r, load = measure(name, index, args, queries)
            rows += r
            loads.append(load)
        ann = {k: dataclasses.asdict(a) for k, a in store.Snapshot.open(large).manifest.ann.items()}
    facts = benchlib.finish(facts)
    print(benchlib.describe_machine(facts))
    print(benchlib.format_table(rows, [("index", "index", ""), ("items", "items", "d"), ("path", "query", ""),
                                       ("runs", "runs", "d"), ("median_ms", "median ms", ".1f"),
                                       ("p95_ms", "p95 ms", ".1f")]))
    print()
    print(benchlib.format_table(loads, [("index", "index", ""), ("clients", "clients", "d"),
                                        ("seconds", "s", ".1f"), ("queries", "queries", "d"), ("qps", "q/s", ".1f"),
                                        ("p50_ms", "p50 ms", ".1f"), ("p95_ms", "p95 ms", ".1f"),
                                        ("p99_ms", "p99 ms", ".1f"), ("unloaded_p95_ms", "unloaded p95", ".1f"),
                                        ("p95_vs_unloaded", "p95/unloaded", ".2f"), ("shed_503", "503s", "d"),
                                        ("errors", "errors", "d"), ("after_ok", "ok after", "d"),
                                        ("after_p95_ms", "p95 after", ".1f"), ("rss_before_mb", "RSS MB", ".0f"),
                                        ("rss_peak_mb", "peak MB", ".0f")]))
    identical = all(load["cli_output_identical"] for load in loads)
    print(f"\nwarm CLI output identical to cold: {identical}; large index: {ann['image']['factory']}, "
          f"recall@10 vs exact {ann['image']['recall_at_10']:.3f}, synthesized in {synth_s:.0f} s")
    quiet = facts["loadavg_start"][0] < 0.5
    if not quiet:
        print(f"taken under load (1-minute load average {facts['loadavg_start'][0]:.2f} at the start): "
              "rerun on a quiet machine for final figures")
    benchlib.write_json(args.out, {"machine": facts, "quiet": quiet, "latency": rows, "load": loads,
                                   "large_index": {"n_images": args.n_large, "ann": ann, "synthesized_s": synth_s,
                                                   "noise_sigma": NOISE}})


if __name__ == "__main__":
    main()
