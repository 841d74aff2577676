"""A build's encoding as a Ray Data job: a pool of encoder actors reads, decodes, encodes and writes segments.

The driver (indexer/build.py, in the `itm-index build --engine ray` process) does what it does for
a local build: it holds the index's lock, scans the source against the index, and afterwards
commits one generation with the same manifest, skip records and incremental semantics. Only
the items that must be encoded go to Ray: `map_batches` with a callable class runs a fixed pool
of actors (one per GPU with `--device cuda`), each loading the model once. An actor takes
`commit_every` items at a time, reads and hashes image files (decoding in threads beside the
forward pass), encodes them, writes them as one immutable segment (store.write_segment, its
parquet file last) straight into the index folder, and returns what became of each item. The
driver stages each segment as its results arrive, so that an interrupted build loses little.

A worker that dies is restarted and its batch retried (RayOptions.retries); past that the build
fails and the index stays as it was. The next build stages the segments the dead build's actors
finished (complete segments no manifest names: `_adopt_finished`) and resumes: an image whose
path, size and mtime match a staged row is not read again.

The index folder must be one file system for the driver and every node (a local disk for a
local cluster, a shared one across machines), as must the corpus' paths.
"""
from __future__ import annotations

import logging
import os
import signal
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import pyarrow as pa

from itm.common.errors import ItmError, ModelMismatchError
from itm.common.options import RayOptions
from itm.common.parallel import ordered_map
from itm.models.identity import ModelIdentity
from itm.models.item_encoder import ItemFeatures, Runtime
from itm.models.loading import load_item_encoder
from itm.models.registry import ModelSpec

from . import store
from .items import decode_image, image_row
from .metadata import COLUMNS as METADATA
from .metadata import read_file_metadata
from .scan import FileEntry


class _Job(Protocol):
    """What the engine reads of a build's work on one source (build.py's _Embedding)."""

    writer: Any  # commit.Writer: stages and adopts segments
    encoder: Any  # the build's lazily loaded item encoder
    options: Any  # BuildOptions
    content: Any  # changes.ContentIndex: which bytes have stored embeddings
    skips: Any  # records each skipped item
    on_progress: Any


FAULT_AFTER_BATCHES: int | None = None  # tests: an actor kills its own process (SIGKILL) at this batch


@dataclass(frozen=True)
class _Task:
    """What every encoder actor needs, sent to it once when it starts."""

    index_dir: Path
    kind: str  # "image" or "text"
    spec: ModelSpec
    runtime: Runtime
    model: ModelIdentity  # the index's model: the actor refuses other weights
    reranker_sha256: str | None
    batch_size: int
    workers: int
    max_pixels: int
    store_dtype: str  # of the rerank store: fp16 or int8
    fault_after: int | None = None


class EncodeActor:
    """One of the pool: loads the model once, then turns each batch of items into one segment."""

    def __init__(self, task: _Task):
        self.task, self.calls = task, 0
        self.encoder = load_item_encoder(task.spec, task.runtime, task.model, task.reranker_sha256)
        sha = self.encoder.store.sha256 if self.encoder.store else None
        if not self.encoder.identity.same_weights(task.model) or sha != task.reranker_sha256:
            raise ModelMismatchError(f"a Ray worker loaded {self.encoder.identity.label}, not the index's "
                                     f"{task.model.label}; give every node the same model files")
        self.encoder.open(task.kind)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.calls += 1
        if self.calls == self.task.fault_after:
            os.kill(os.getpid(), signal.SIGKILL)
        rows = batch.to_pylist()
        return self._images(rows) if self.task.kind == "image" else self._texts(rows)

    def _images(self, items: list[dict]) -> pa.Table:
        t = self.task
        entries = [FileEntry(Path(os.fsdecode(r["path"])), r["size"], r["mtime_ns"]) for r in items]
        prepare = lambda data: self.encoder.load_pixels(data, t.max_pixels)  # noqa: E731
        results, good, feats, pending = [], [], [], []
        for d in ordered_map(lambda e: decode_image(e, prepare), entries, t.workers, prefetch=t.batch_size):
            results.append({"hash": d.hash, "error": d.error, "offset": len(good) + len(pending) if d.error is None
                            else None, **d.meta})
            if d.error is None:
                pending.append(d)
            if len(pending) == t.batch_size or (pending and len(results) == len(entries)):
                feats.append(self.encoder.encode_images(np.stack([p.pixels for p in pending])))  # (B, 3, S, S) in
                good += [image_row(p.entry, p.hash, meta=p.meta) for p in pending]
                pending = []
        name = self._write(good, feats)
        return pa.Table.from_pylist([{**item, **r, "segment": name if r["error"] is None else None,
                                      "segment_rows": len(good)} for item, r in zip(items, results)],
                                    schema=_IMAGE_RESULT)

    def _texts(self, rows: list[dict]) -> pa.Table:
        bs = self.task.batch_size
        feats = [self.encoder.encode_texts([r["text"] for r in rows[i:i + bs]]) for i in range(0, len(rows), bs)]
        name = self._write(rows, feats)
        return pa.Table.from_pylist([{"hash": r["hash"], "segment": name, "offset": i, "segment_rows": len(rows)}
                                     for i, r in enumerate(rows)], schema=_TEXT_RESULT)

    def _write(self, rows: list[dict], feats: list[ItemFeatures]) -> str | None:
        if not rows:
            return None
        join = lambda part: np.concatenate([getattr(f, part) for f in feats]) \
            if getattr(feats[0], part) is not None else None  # noqa: E731
        name = store.new_segment_name()
        store.write_segment(self.task.index_dir, name, pa.Table.from_pylist(rows, schema=store.SEGMENT_SCHEMA),
                            join("emb"), join("tok"), join("mask"), self.task.store_dtype,
                            self.task.runtime.precision)
        return name


_IMAGE_RESULT = pa.schema([("path", pa.binary()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                           ("hash", pa.string()), ("error", pa.string()), ("segment", pa.string()),
                           ("offset", pa.int64()), ("segment_rows", pa.int64()),
                           *(store.SEGMENT_SCHEMA.field(c) for c in METADATA)])  # the file's, read by the actor
_TEXT_RESULT = pa.schema([("hash", pa.string()), ("segment", pa.string()), ("offset", pa.int64()),
                          ("segment_rows", pa.int64())])


# ---- the driver ---------------------------------------------------------------------------------
def encode_images(job: _Job, root: Path, changes, todo: list[FileEntry]) -> None:
    """Encode the changed image files `todo` of folder `root` on Ray; record each in `changes` as the local build does."""
    source = os.fsencode(root)
    staged = _adopt_finished(job)
    fresh = []
    for e in todo:  # files a dead build's actors already encoded are not read again
        h = staged.get((os.fsencode(e.path), e.size, e.mtime_ns))
        if h is None:
            fresh.append(e)
        else:
            changes.add(image_row(e, h, source, read_file_metadata(e.path)), job.content)
    done = len(todo) - len(fresh)
    job.on_progress(done, len(todo))
    items = [{"path": os.fsencode(e.path), "size": e.size, "mtime_ns": e.mtime_ns} for e in fresh]
    segments = _Segments(job)
    for r in _run(job, "image", items):
        done += 1
        job.on_progress(done, len(todo))
        entry = FileEntry(Path(os.fsdecode(r["path"])), r["size"], r["mtime_ns"])
        if r["error"] is not None and r["hash"] not in job.content:  # bytes already stored need no decoding
            job.skips(entry.path, r["error"])
            continue
        changes.add(image_row(entry, r["hash"], source, {c: r[c] for c in METADATA}), job.content)
        segments.arrived(r)


def encode_texts(job: _Job, rows: list[dict]) -> None:
    """Encode the texts `rows` (already recorded in the build's changes) on Ray."""
    _adopt_finished(job)
    segments = _Segments(job)
    for r in _run(job, "text", rows):
        segments.arrived(r)


class _Segments:
    """Segments whose results are arriving: staged, and their contents made known, once all their rows are in."""

    def __init__(self, job: _Job):
        self.job = job
        self.hashes: dict[str, dict[int, str]] = {}

    def arrived(self, r: dict[str, Any]) -> None:
        if r["segment"] is None:
            return
        seen = self.hashes.setdefault(r["segment"], {})
        seen[r["offset"]] = r["hash"]
        if len(seen) == r["segment_rows"]:
            self.job.writer.adopt(r["segment"], r["segment_rows"])
            self.job.content.add(r["segment"], [seen[i] for i in range(len(seen))])
            del self.hashes[r["segment"]]


def _adopt_finished(job: _Job) -> dict[tuple[bytes, int, int], str]:
    """Stage the complete segments that no manifest names (a dead build's actors wrote them), and return
    the content hash of each staged row by (path, size, mtime_ns)."""
    writer = job.writer
    named = writer.manifest.files()
    for p in sorted(writer.index_dir.glob("seg-*.parquet")):  # the parquet file is written last: complete
        if p.name not in named:
            hashes = store.read_table(p, store.SEGMENT_SCHEMA).column("hash").to_pylist()
            writer.adopt(p.name[:-len(".parquet")], len(hashes))
            job.content.add(p.name[:-len(".parquet")], hashes)
    staged = {}
    for seg in writer.manifest.staging:
        for r in store.read_table(writer.index_dir / f"{seg}.parquet", store.SEGMENT_SCHEMA).to_pylist():
            if r["kind"] == "image":  # a text's row names its text file, whose size and mtime say nothing of it
                staged[(r["path"], r["size"], r["mtime_ns"])] = r["hash"]
    return staged


def _run(job: _Job, kind: str, items: list[dict]) -> Iterator[dict[str, Any]]:
    """The results of encoding `items` on the actor pool, item by item in input order."""
    if not items:
        return
    opts = job.options.ray or RayOptions()
    with _cluster(opts) as ray:
        task = _task(job, kind, opts)
        gpu = task.runtime.device.startswith("cuda")
        resources = ray.cluster_resources()
        actors = opts.actors or max(1, int(resources.get("GPU", 0)) if gpu
                                    else int(resources.get("CPU", 1)) // opts.cpus_per_actor)
        with warnings.catch_warnings():
            # Ray Data restarts actors and retries their batches without end unless told otherwise, and the
            # remote arguments that tell it (its own comments name max_restarts=0) warn of a coming rename
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ray.data.from_items(items).map_batches(
                EncodeActor, fn_constructor_args=(task,), batch_size=job.options.commit_every, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=opts.cpus_per_actor,
                num_gpus=1 if gpu else 0, max_restarts=opts.retries, max_task_retries=opts.retries)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                yield from batch.to_pylist()
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, ItmError):
                raise cause from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ItmError(f"the Ray job encoding {job.writer.index_dir} failed ({type(e).__name__}: {first}); "
                           "the index is as it was, and building again resumes from what was encoded") from None


def _task(job: _Job, kind: str, opts: RayOptions) -> _Task:
    m, enc = job.writer.manifest, job.encoder
    # Ray gives each actor its own GPU, which it sees as the only one: cuda:1 means nothing there
    device = "cuda" if enc.runtime.device.startswith("cuda") else enc.runtime.device
    runtime = Runtime(enc.runtime.backend, device, enc.runtime.precision, enc.runtime.threads or opts.cpus_per_actor)
    return _Task(job.writer.index_dir.resolve(), kind, enc.spec, runtime, m.model,
                 m.reranker.sha256 if m.reranker else None, job.options.batch_size,
                 min(job.options.workers, 2 * opts.cpus_per_actor), job.options.max_pixels,
                 job.writer.store_dtype or "fp16", FAULT_AFTER_BATCHES)


@contextmanager
def _cluster(opts: RayOptions) -> Iterator[Any]:
    """Ray, connected: to the cluster this process already joined, to `opts.address`, or to a local one
    started here (and stopped afterwards)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ItmError("--engine ray needs Ray Data: pip install 'itm[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=opts.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows and skips in scan order, as a local build makes them
    ctx.enable_progress_bars = False  # the command draws its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
