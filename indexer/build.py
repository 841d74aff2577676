"""build_index: embed a folder of images or a file of texts into an index, incrementally.

The build finds what changed (indexer/changes.py) first and loads the model only when something
must be encoded; it decodes images in threads while the model encodes full batches, stages
segments as they fill, and commits one new generation (indexer/commit.py), compacting
(indexer/compact.py) when enough stored rows have died. A build that changes nothing commits
nothing. The model runs through the item encoder (models/item_encoder.py): exported graphs on
a CPU by default, so that a build with the export cached imports neither torch nor open_clip.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from itm.common.errors import CorpusError, ItmError, ItmWarning
from itm.common.options import BuildOptions
from itm.common.parallel import ordered_map
from itm.common.paths import default_index_dir
from itm.models.artifacts import check_card
from itm.models.checkpoint import file_sha256
from itm.models.item_encoder import ItemEncoder, ItemFeatures, Runtime
from itm.models.loading import load_item_encoder
from itm.models.registry import ModelSpec, claimed_identity, resolve_model

from . import store
from .changes import ContentIndex, SourceChanges, content_hash
from .commit import Writer, locked
from .compact import compact, dead_share
from .items import Decoded, decode_image, image_row
from .listing import Listing, record
from .manifest import Manifest, RerankerInfo, check_model, check_reranker, spec_for_index
from .migrate import migrate_rows
from .scan import FileEntry, is_text_corpus, read_texts, scan_images

__all__ = ["BuildOptions", "BuildReport", "BuildTimings", "build_index"]

OnSkip = Callable[[str, str], None]  # (path, reason) of an item the build could not use
OnProgress = Callable[[int, int], None]  # (items prepared, items to prepare) as the build goes


@dataclass(frozen=True)
class BuildTimings:
    """Where a build's time went, in seconds."""

    model_load_s: float = 0.0  # loading the encoders and the store encoder (within embed_s when loaded on demand)
    embed_s: float = 0.0  # scanning, reading, decoding, encoding and staging segments
    forward_s: float = 0.0  # the encoders' forward passes (and the rerank store's projection), within embed_s
    commit_s: float = 0.0  # rows, ANN indexes, manifest, garbage collection
    compact_s: float = 0.0  # compaction, when the build ran one


@dataclass(frozen=True)
class BuildReport:
    index_dir: Path
    added: int
    updated: int
    removed: int
    unchanged: int
    skipped: int
    reused: int  # added or updated items whose embedding was found by content hash
    images: int  # totals in the index after the build
    texts: int
    seconds: float
    compacted: int = 0  # dead rows dropped by the compaction the build ran (0: none)
    timings: BuildTimings = BuildTimings()


def build_index(source: Path | str, index_dir: Path | str | None = None, model: ModelSpec | None = None,
                options: BuildOptions | None = None, on_skip: OnSkip | None = None,
                on_progress: OnProgress | None = None) -> BuildReport:
    """Add a folder of images or a text corpus to an index, embedding only what changed.

    >>> build_index("photos/", "idx/", resolve_model("itm-tiny", "random")).added
    12
    """
    t0 = time.perf_counter()
    clock = _Clock()
    options = options or BuildOptions()
    source = Path(source).expanduser().resolve()
    if not source.exists():
        raise CorpusError(f"{source} does not exist; pass a folder of images or a text file")
    index_dir = Path(index_dir) if index_dir else default_index_dir()
    index_dir.mkdir(parents=True, exist_ok=True)
    with locked(index_dir, options.wait):
        writer = Writer(index_dir)
        repaired = bool(writer.damage)
        if repaired:
            _repair(writer, source)
        tower = "text" if is_text_corpus(source) else "image"
        encoder = _Encoder(writer.manifest, index_dir, model, options, clock, tower)
        if writer.manifest is None:  # a new index records its model before the first segment is staged
            writer.start(encoder().identity, _reranker_info(encoder.spec, encoder(), options.store_dtype))
        _check_store_dtype(writer, options.store_dtype)
        migrate_rows(writer)  # a format-2 index gets its images' metadata (indexer/migrate.py)
        job = _Embedding(writer, encoder, options, clock, _Skips(source, on_skip), on_progress)
        with clock("embed_s"):
            changes = job.texts(source) if is_text_corpus(source) else job.images(source)
        if job.nothing_changed(source, changes) and not repaired:
            return _report(index_dir, changes, job, writer.manifest, t0, 0, clock)
        with clock("commit_s"):
            manifest = job.commit(source, changes)
        with clock("compact_s"):
            compacted = compact(writer, options.commit_every) \
                if dead_share(manifest, writer.rows) >= options.compact_at else 0
    return _report(index_dir, changes, job, manifest, t0, compacted, clock)


def _repair(writer: Writer, source: Path) -> None:
    """Leave out what the index's damaged files held (this build encodes it again and commits new files), saying
    so; items of other sources that were left out come back when those sources are built again."""
    names = ", ".join(name for name, _ in writer.damage[:3]) + (" ..." if len(writer.damage) > 3 else "")
    lost = [s for s in writer.repair() if s != os.fsdecode(source)]
    again = f"; build these again too: {', '.join(lost)}" if lost else ""
    warnings.warn(f"repairing {writer.index_dir}: {len(writer.damage)} damaged files ({names}); what they held is "
                  f"encoded again{again}", ItmWarning, stacklevel=3)


def _report(index_dir: Path, changes: SourceChanges, job: _Embedding, manifest: Manifest, t0: float,
            compacted: int, clock: _Clock) -> BuildReport:
    return BuildReport(index_dir, changes.added, changes.updated, changes.removed, changes.unchanged,
                       len(job.skips.rows), changes.reused, manifest.counts["image"], manifest.counts["text"],
                       time.perf_counter() - t0, compacted, clock.timings())


class _Encoder:
    """The build's item encoder, loaded on first use and checked against the index's model.

    A rebuild that finds nothing to encode never loads it. Safe to call from decoding threads.
    """

    def __init__(self, manifest: Manifest | None, index_dir: Path, model: ModelSpec | None, options: BuildOptions,
                 clock: _Clock, tower: str):
        self.manifest, self.index_dir, self.clock, self.tower = manifest, index_dir, clock, tower
        self.spec = model or (spec_for_index(manifest, index_dir) if manifest else resolve_model())
        self.runtime = Runtime(options.backend, options.device, options.precision, options.threads)
        # the index's own model is known by its manifest: its export is found without hashing checkpoints
        self.known = manifest.model if manifest and model is None else None
        self.reranker_sha = manifest.reranker.sha256 if self.known and manifest.reranker else None
        if manifest is not None and model is not None:  # another model is refused before it is loaded or exported
            self.known = claimed_identity(model, manifest.model)
            self.reranker_sha = file_sha256(model.reranker) if model.reranker else None
            check_model(manifest, self.known, index_dir)
            check_reranker(manifest, self.reranker_sha, index_dir)
        self._encoder: ItemEncoder | None = None
        self._lock = threading.Lock()

    def __call__(self) -> ItemEncoder:
        with self._lock:
            if self._encoder is None:
                with self.clock("model_load_s"):
                    encoder = load_item_encoder(self.spec, self.runtime, self.known, self.reranker_sha)
                    encoder.open(self.tower)  # the tower this source needs: set up here, not in its first batch
                if self.manifest is not None:
                    check_model(self.manifest, encoder.identity, self.index_dir)
                    check_reranker(self.manifest, encoder.store.sha256 if encoder.store else None, self.index_dir)
                self._encoder = encoder
            return self._encoder


def _reranker_info(spec: ModelSpec, encoder: ItemEncoder, store_dtype: str | None) -> RerankerInfo | None:
    if encoder.store is None:
        return None
    check_card(spec.reranker, encoder.identity)  # a reranker trained for other features is refused
    sha = encoder.store.sha256
    return RerankerInfo(sha256=sha, file=f"reranker-{sha[:16]}.safetensors", source=str(spec.reranker),
                        image_shape=encoder.store.image_shape, text_shape=encoder.store.text_shape,
                        store_dtype="int8" if store_dtype == "int8" else None)


def _check_store_dtype(writer: Writer, asked: str | None) -> None:
    """The store's dtype is chosen when the index is made; a build that asks for the other one is refused."""
    if asked is not None and asked not in store.STORE_DTYPES:
        raise ItmError(f"unknown rerank store dtype {asked!r}; choose one of {', '.join(store.STORE_DTYPES)}")
    if asked is not None and writer.manifest.reranker is not None and asked != (writer.store_dtype or "fp16"):
        raise ItmError(f"index at {writer.index_dir} keeps its rerank store as {writer.store_dtype or 'fp16'}; "
                       f"build a new --index for {asked}")


class _Clock:
    """Seconds spent in each named phase of a build (a phase may be timed in a decoding thread)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def timings(self) -> BuildTimings:
        return BuildTimings(**self.seconds)


@dataclass
class _Skips:
    """Items of the source the build could not use: recorded for the index, and reported as they happen."""

    source: Path
    on_skip: OnSkip | None
    rows: list[dict] = field(default_factory=list)

    def __call__(self, path: Any, reason: str) -> None:
        self.rows.append({"source": os.fsencode(self.source), "path": os.fsencode(path), "reason": reason})
        if self.on_skip:
            self.on_skip(os.fsdecode(path), reason)


class _Batches:
    """Items waiting for a forward pass: full batches are encoded, and every `commit_every` items staged."""

    def __init__(self, encode: Callable[[list], tuple[list[dict], ItemFeatures]], job: _Embedding):
        self.encode, self.job = encode, job
        self.batch: list = []
        self.parts: list[tuple[list[dict], ItemFeatures]] = []

    def add(self, item: Any) -> None:
        self.batch.append(item)
        if len(self.batch) >= self.job.options.batch_size:
            self._encode()
            if sum(len(p[0]) for p in self.parts) >= self.job.options.commit_every:
                self._stage()

    def close(self) -> None:
        if self.batch:
            self._encode()
        self._stage()

    def _encode(self) -> None:
        with self.job.clock("forward_s"):
            self.parts.append(self.encode(self.batch))
        self.batch = []

    def _stage(self) -> None:
        if not self.parts:
            return
        rows = [r for p in self.parts for r in p[0]]
        feats = [p[1] for p in self.parts]
        join = lambda part: np.concatenate([getattr(f, part) for f in feats]) \
            if getattr(feats[0], part) is not None else None  # noqa: E731
        name = self.job.writer.stage(rows, join("emb"), join("tok"), join("mask"), self.job.options.precision)
        self.job.content.add(name, [r["hash"] for r in rows])
        self.parts = []


class _Embedding:
    """One build's work on one source: find the changes, prepare and encode what they need, commit."""

    def __init__(self, writer: Writer, encoder: _Encoder, options: BuildOptions, clock: _Clock, skips: _Skips,
                 on_progress: OnProgress | None):
        self.writer, self.encoder = writer, encoder
        self.options, self.clock, self.skips = options, clock, skips
        self.on_progress = on_progress or (lambda done, total: None)
        self.old_rows = writer.rows.to_pylist()
        self.content = ContentIndex.of(self.old_rows, writer.staged_hashes())

    # ---- images -------------------------------------------------------------------------
    def images(self, root: Path) -> SourceChanges:
        changes, todo = self._changed_images(root)
        if self.options.ray is not None:  # Ray Data's actors read, decode, encode and write the segments
            from .ray_engine import encode_images

            encode_images(self, root, changes, todo)
            return changes
        self.on_progress(0, len(todo))
        batches = _Batches(self._encode_images, self)
        # decoded images waiting for the model: the next batch, decoded while this one is encoded, and no more
        items = ordered_map(self._decode, todo, self.options.workers, prefetch=self.options.batch_size)
        for done, item in enumerate(items, 1):
            self.on_progress(done, len(todo))
            if item.error is not None:
                self.skips(item.entry.path, item.error)
                continue
            if changes.add(image_row(item.entry, item.hash, os.fsencode(root), item.meta), self.content):
                batches.add(item)
        batches.close()
        return changes

    def _changed_images(self, root: Path) -> tuple[SourceChanges, list[FileEntry]]:
        """The folder scanned against the index: unchanged files kept, the others to prepare."""
        changes = SourceChanges.of(self.old_rows, os.fsencode(root), key="path")
        todo: list[FileEntry] = []
        self.listing = Listing(root, self.options)
        for entry in scan_images(root, exclude=self.options.exclude, include_hidden=self.options.include_hidden,
                                 on_skip=self.skips):
            self.listing.add(entry.path, entry.size, entry.mtime_ns)
            if changes.same_file(os.fsencode(entry.path), entry.size, entry.mtime_ns):
                changes.keep(os.fsencode(entry.path))
            else:
                todo.append(entry)
        return changes, todo

    def _decode(self, entry: FileEntry) -> Decoded:
        """Read once, hash, and decode only when no embedding exists for these bytes yet (in a worker thread)."""
        return decode_image(entry, lambda data: self.encoder().load_pixels(data, self.options.max_pixels),
                            stored=self.content.__contains__)

    def _encode_images(self, batch: list[Decoded]) -> tuple[list[dict], ItemFeatures]:
        feats = self.encoder().encode_images(np.stack([d.pixels for d in batch]))  # (B, 3, S, S) in
        return [image_row(d.entry, d.hash, meta=d.meta) for d in batch], feats

    # ---- texts --------------------------------------------------------------------------
    def texts(self, path: Path) -> SourceChanges:
        st = path.stat()
        self.listing = Listing(path, self.options)
        self.listing.add(str(path), st.st_size, st.st_mtime_ns)
        changes = SourceChanges.of(self.old_rows, os.fsencode(path), key="source_id")
        if changes.old and all(changes.same_file(k, st.st_size, st.st_mtime_ns) for k in changes.old):
            for key in changes.old:
                changes.keep(key)
            return changes
        items = read_texts(path, text_column=self.options.text_column, id_column=self.options.id_column,
                           on_skip=self.skips)
        self.on_progress(0, len(items))
        claimed: list[dict] = []  # texts to encode, for Ray's actors
        batches = _Batches(self._encode_texts, self) if self.options.ray is None else None
        seen: set[str] = set()
        for done, item in enumerate(items, 1):
            self.on_progress(done, len(items))
            if item.source_id in seen:
                self.skips(f"{path}:{item.source_id}", "duplicate id")
                continue
            seen.add(item.source_id)
            h = content_hash(item.text.encode())
            old = changes.old.get(item.source_id)
            if old is not None and old["hash"] == h:
                changes.keep(item.source_id, size=st.st_size, mtime_ns=st.st_mtime_ns)
                continue
            row = {"kind": "text", "source": os.fsencode(path), "path": os.fsencode(path), "text": item.text,
                   "source_id": item.source_id, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": h}
            if not changes.add(row, self.content):
                continue
            if batches is None:
                claimed.append(row)
            else:
                batches.add(row)
        if batches is None:  # Ray Data's actors encode the claimed texts and write the segments
            from .ray_engine import encode_texts

            encode_texts(self, claimed)
        else:
            batches.close()
        return changes

    def _encode_texts(self, batch: list[dict]) -> tuple[list[dict], ItemFeatures]:
        return batch, self.encoder().encode_texts([r["text"] for r in batch])

    # ---- commit -------------------------------------------------------------------------
    def nothing_changed(self, source: Path, changes: SourceChanges) -> bool:
        """True when the build found the source as the index holds it: no new generation is needed."""
        old_skips = [s for s in self.writer.skipped.to_pylist() if s["source"] == os.fsencode(source)]
        same_skips = sorted(map(_skip_key, old_skips)) == sorted(map(_skip_key, self.skips.rows))
        return not (changes.added or changes.updated or changes.removed or changes.restamped
                    or self.writer.manifest.staging) and same_skips

    def commit(self, source: Path, changes: SourceChanges):
        """The next generation: the other sources' rows as they were, and this source's rows after the build."""
        mine, next_id = changes.rows(self.content, self.writer.manifest.next_id)
        others = [r for r in self.old_rows if r["source"] != os.fsencode(source)]
        rows = pa.Table.from_pylist(others + mine, schema=store.ROW_SCHEMA)
        skipped = [s for s in self.writer.skipped.to_pylist() if s["source"] != os.fsencode(source)] + self.skips.rows
        # the source's listing, for the next build to find nothing changed without reading the rows; none when
        # something was skipped, so that the next build tries it again
        listings = {k: v for k, v in self.writer.manifest.listings.items() if k != os.fsdecode(source)}
        if not self.skips.rows:
            listings[os.fsdecode(source)] = record(self.listing, len(mine))
        return self.writer.commit(rows, pa.Table.from_pylist(skipped, schema=store.SKIP_SCHEMA), next_id,
                                  self.options.faiss_factory, recall_target=self.options.recall_target,
                                  listings=listings)


def _skip_key(row: dict) -> tuple[bytes, str]:
    return row["path"], row["reason"]
