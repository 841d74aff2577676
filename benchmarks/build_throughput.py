"""Index-build throughput beside the model's own forward rate: many small images, and 12 MP photos.

    python benchmarks/build_throughput.py [--model ViT-B-32 --pretrained random] [--batch-size 16]
        [--workers N] [--precision fp32|bf16] [--small-count 128] [--large-count 48] [--repeats 3]
        [--torch-threads N] [--cache DIR] [--out benchmarks/results/build_throughput.json]

For each generated corpus, in one run on one machine:

- decode: read + `load_image` + `prepare` in `--workers` threads, what the build's decoding
  threads do minus the content hash (a per-stage split, one item at a time, comes with it);
- model: `encode_images` on already prepared pixels, in the same batch sizes as the build, after
  a warm-up batch, with idle decoding threads alive as in the build (see `model_rate`);
- build: `build_index` into a fresh temporary folder. `e2e` is BuildReport.seconds (model load,
  scan, decode, encode, segment writes, FAISS, manifest); `embed` is the scan/decode/encode loop
  alone (BuildReport.timings), so a short corpus is not judged by the model load. The forward
  passes inside the build are timed too: `stall` is the share of the embedding loop spent
  waiting on decoding, and `fwd-in-build/s` against `model/s` shows how much the decoding
  threads slow the forward passes down by competing for the cores;
- bound: the embed ratio a build could reach if its decoding overlapped the forward passes
  perfectly. The forward passes keep every core busy, so each item's decoding (read + hash +
  load_image + prepare, one item at a time) adds its core time: 1 / (1 + decode s x model/s / cores).
  A build near its bound gains only from less decoding work per item, not from better overlap.

Model-only runs and builds alternate, M B M B M B M, and each build is divided by the mean of
the two model-only runs beside it: on a shared machine the rate drifts between runs. The table
gives medians over the repeats and the range of the ratio.

Corpora are generated once into `--cache` and reused; generation is never timed. Files are in
the page cache when the build reads them (the decode pass read them first), so disk speed is not
part of the figures.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from itm.common.parallel import ordered_map
from itm.indexer.build import BuildOptions, build_index
from itm.models.encoder import DualEncoder
from itm.models.images import load_image, read_file
from itm.models.item_encoder import default_threads
from itm.models.registry import resolve_model

import benchlib

GENERATOR_VERSION = 1  # bump when benchlib.photo_like changes, so cached corpora are regenerated
STAGE_SAMPLE = 8  # items timed one stage at a time


@dataclass(frozen=True)
class Corpus:
    name: str
    count: int
    width: int
    height: int
    formats: tuple[str, ...]  # cycled over the images: ("png", "jpg")
    quality: int = 90  # JPEG quality

    @property
    def key(self) -> str:
        return (f"{self.name}-{self.count}x{self.width}x{self.height}-{'+'.join(self.formats)}"
                f"-q{self.quality}-v{GENERATOR_VERSION}")


def ensure_corpus(corpus: Corpus, cache: Path) -> Path:
    """The corpus folder, generated on first use; a marker file says it is complete."""
    folder = cache / corpus.key
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(corpus.count):
        fmt = corpus.formats[i % len(corpus.formats)]
        path = folder / f"{corpus.name}_{i:05d}.{fmt}"
        if path.exists():
            continue
        rng = np.random.default_rng([GENERATOR_VERSION, corpus.width, corpus.height, i])
        image = benchlib.photo_like(rng, corpus.width, corpus.height)
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, "JPEG" if fmt == "jpg" else "PNG", quality=corpus.quality)
        os.replace(tmp, path)
    marker.write_text("")
    return folder


def decode_all(paths: list[Path], encoder: DualEncoder, workers: int, prefetch: int) -> list[torch.Tensor]:
    """What a decoding thread does for each item, less hashing: read, decode, preprocess."""
    def work(path: Path) -> torch.Tensor:
        return encoder.load_pixels(read_file(path))

    return list(ordered_map(work, paths, workers, prefetch))


def stage_split(paths: list[Path], encoder: DualEncoder) -> dict[str, float]:
    """Milliseconds per item of each stage, one item at a time, in a worker thread as the build runs them.

    `prepare_1thread` repeats `prepare` with torch's intra-op threads at 1 in that thread only, to
    show what the preprocessing's small tensor ops pay for intra-op parallelism.
    """
    def run() -> dict[str, float]:
        times: dict[str, list[float]] = {k: [] for k in ("read", "hash", "load_image", "prepare", "prepare_1thread")}
        for path in paths:
            t0 = time.perf_counter()
            data = read_file(path)
            t1 = time.perf_counter()
            hashlib.blake2b(data, digest_size=16).hexdigest()
            t2 = time.perf_counter()
            image = load_image(data, min_side=encoder.image_size)
            t3 = time.perf_counter()
            encoder.prepare(image)
            t4 = time.perf_counter()
            for key, seconds in zip(("read", "hash", "load_image", "prepare"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key].append(seconds * 1000)
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # this thread only (OpenMP and MKL thread counts are per thread)
        try:
            for path in paths:
                image = load_image(read_file(path), min_side=encoder.image_size)
                t0 = time.perf_counter()
                encoder.prepare(image)
                times["prepare_1thread"].append((time.perf_counter() - t0) * 1000)
        finally:
            torch.set_num_threads(before)
        return {k: statistics.median(v) for k, v in times.items()}

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


def model_rate(encoder: DualEncoder, pixels: list[torch.Tensor], batch_size: int, workers: int) -> float:
    """Items/s of encode_images alone over the same batches the build makes, after one warm-up batch.

    Timed while `workers` idle threads that have run `prepare` are alive, as the build's decoding
    threads are: libgomp (torch's OpenMP) spins far less at its barriers once it manages more
    threads than there are CPUs, and on a busy machine that alone moves the forward rate by tens
    of percent. Without this the model-only rate and the build would run under two different
    runtime regimes.
    """
    batches = [torch.stack(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]  # (B, 3, S, S)
    with _idle_decoders(encoder, workers):
        encoder.encode_images(batches[0])
        start = time.perf_counter()
        for batch in batches:
            encoder.encode_images(batch)
        return len(pixels) / (time.perf_counter() - start)


@contextmanager
def _idle_decoders(encoder: DualEncoder, workers: int) -> Iterator[None]:
    if workers <= 0:
        yield
        return
    image = Image.new("RGB", (2 * encoder.image_size, 2 * encoder.image_size))
    ready = threading.Barrier(workers)  # one task per thread: each waits until all threads have one

    def touch() -> None:
        encoder.prepare(image)
        ready.wait()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-idle") as pool:
        for f in [pool.submit(touch) for _ in range(workers)]:
            f.result()
        yield


def build_once(folder: Path, spec, options: BuildOptions, expected: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="itm-bench-index-") as index_dir:
        report = build_index(folder, index_dir, spec, options)
    t = report.timings
    phases = {"model_load": t.model_load_s, "embed": t.embed_s, "forward": t.forward_s, "commit": t.commit_s}
    if report.added != expected:
        raise RuntimeError(f"build added {report.added} of {expected} items; see skipped files in the index")
    return {"seconds": report.seconds, "phases_s": phases, "e2e_items_per_s": report.added / report.seconds,
            "embed_items_per_s": report.added / phases["embed"],
            "forward_in_build_items_per_s": report.added / phases["forward"],  # forward passes alone, mid-build
            "stall_fraction": 1 - phases["forward"] / phases["embed"]}  # embed loop time not spent in forward


def run_corpus(corpus: Corpus, folder: Path, encoder: DualEncoder, args: argparse.Namespace) -> dict:
    """Model-only and build runs alternate (M B M B ... M); each build is set against the two beside it."""
    paths = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    # the torch backend, whose forward rate this script measures (benchmarks/vs_rclip.py measures the onnx one)
    options = BuildOptions(batch_size=args.batch_size, precision=args.precision, backend="torch",
                           **({"workers": args.workers} if args.workers is not None else {}))
    decode_s, pixels = benchlib.timed(lambda: decode_all(paths, encoder, options.workers, 4 * args.batch_size))
    stages = stage_split(paths[:STAGE_SAMPLE], encoder)
    models = [model_rate(encoder, pixels, args.batch_size, options.workers)]
    builds = []
    for _ in range(args.repeats):
        build = build_once(folder, encoder.spec, options, len(paths))
        models.append(model_rate(encoder, pixels, args.batch_size, options.workers))
        beside = (models[-2] + models[-1]) / 2
        builds.append({**build, "model_items_per_s_beside": beside, "ratio_e2e": build["e2e_items_per_s"] / beside,
                       "ratio_embed": build["embed_items_per_s"] / beside})
    median = lambda key: statistics.median(b[key] for b in builds)  # noqa: E731
    decode_core_s = sum(stages[k] for k in ("read", "hash", "load_image", "prepare")) / 1000
    return {
        "corpus": asdict(corpus) | {"key": corpus.key},
        "items": len(paths),
        "mean_file_mb": statistics.mean(p.stat().st_size for p in paths) / 1e6,
        "workers": options.workers,
        "decode_items_per_s": len(paths) / decode_s,
        "stage_ms": stages,
        "model_items_per_s_runs": models,
        "builds": builds,
        # medians over the repeats; ranges are min-max over the repeats
        "model_items_per_s": statistics.median(models),
        "build_e2e_items_per_s": median("e2e_items_per_s"),
        "build_embed_items_per_s": median("embed_items_per_s"),
        "ratio_e2e": median("ratio_e2e"),
        "ratio_embed": median("ratio_embed"),
        "ratio_embed_range": [min(b["ratio_embed"] for b in builds), max(b["ratio_embed"] for b in builds)],
        "ratio_bound": 1 / (1 + decode_core_s * statistics.median(models) / default_threads()),
        "forward_in_build_items_per_s": median("forward_in_build_items_per_s"),
        "stall_fraction": median("stall_fraction"),
        "build_phases_s": {k: statistics.median(b["phases_s"][k] for b in builds) for k in builds[0]["phases_s"]},
        "build_seconds": median("seconds"),
    }


def print_results(rows: list[dict], facts: dict) -> None:
    flat = [{"name": r["corpus"]["name"], **{k: v for k, v in r.items() if not isinstance(v, (dict, list))},
             "embed_range": "{:.2f}-{:.2f}".format(*r["ratio_embed_range"]),
             "model_runs": " ".join(f"{m:.2f}" for m in r["model_items_per_s_runs"]),
             **{f"stage_{k}": v for k, v in r["stage_ms"].items()},
             **{f"phase_{k}": v for k, v in r["build_phases_s"].items()}} for r in rows]
    print(benchlib.describe_machine(facts))
    print()
    print("items/s; build figures and ratios are medians over the repeats, each build against the model-only runs "
          "beside it")
    print(benchlib.format_table(flat, [
        ("name", "corpus", "s"), ("items", "items", "d"), ("mean_file_mb", "MB/file", ".2f"),
        ("decode_items_per_s", "decode/s", ".1f"), ("model_items_per_s", "model/s", ".2f"),
        ("build_e2e_items_per_s", "build e2e/s", ".2f"), ("build_embed_items_per_s", "build embed/s", ".2f"),
        ("ratio_e2e", "ratio e2e", ".2f"), ("ratio_embed", "ratio embed", ".2f"),
        ("embed_range", "embed range", "s"), ("ratio_bound", "bound", ".2f")]))
    print()
    print("per item, one at a time in a worker thread (ms, median); build phases (s, median); stall = share of the "
          "embed loop not spent in forward passes; every model-only run")
    print(benchlib.format_table(flat, [
        ("name", "corpus", "s"), ("stage_read", "read", ".1f"), ("stage_hash", "hash", ".1f"),
        ("stage_load_image", "load_image", ".1f"), ("stage_prepare", "prepare", ".1f"),
        ("stage_prepare_1thread", "prepare@1thr", ".1f"), ("phase_model_load", "load s", ".1f"),
        ("phase_embed", "embed s", ".1f"), ("phase_forward", "forward s", ".1f"), ("phase_commit", "commit s", ".2f"),
        ("build_seconds", "total s", ".1f"), ("stall_fraction", "stall", ".2f"),
        ("forward_in_build_items_per_s", "fwd-in-build/s", ".2f"), ("model_runs", "model/s runs", "s")]))


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "itm" / "bench-corpora"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="random")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: the builder's)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--small-count", type=int, default=128, help="320x240 images, PNG and JPEG alternating")
    parser.add_argument("--large-count", type=int, default=48, help="4000x3000 JPEGs, quality 90")
    parser.add_argument("--repeats", type=int, default=3, help="builds per corpus, alternating with model-only runs")
    parser.add_argument("--cache", type=Path, default=default_cache(), help="where generated corpora are kept")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads of the main thread (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = parser.parse_args()

    corpora = [c for c in (Corpus("small", args.small_count, 320, 240, ("png", "jpg")),
                           Corpus("12mp", args.large_count, 4000, 3000, ("jpg",))) if c.count > 0]
    folders = [ensure_corpus(c, args.cache) for c in corpora]  # before the clock starts
    benchlib.set_torch_threads(args.torch_threads)
    facts = benchlib.machine_facts()
    spec = resolve_model(args.model, args.pretrained)
    encoder = DualEncoder.load(spec, precision=args.precision)
    rows = [run_corpus(c, f, encoder, args) for c, f in zip(corpora, folders)]
    facts = benchlib.finish(facts)
    print_results(rows, facts)
    benchlib.write_json(args.out, {
        "benchmark": "build_throughput", "machine": facts,
        "settings": {"model": args.model, "pretrained": args.pretrained, "batch_size": args.batch_size,
                     "precision": args.precision, "image_size": encoder.image_size, "repeats": args.repeats,
                     "workers": args.workers, "torch_threads": args.torch_threads},
        "results": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
