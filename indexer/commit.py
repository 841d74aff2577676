"""Writing an index: one writer at a time, segments staged as they are encoded, each generation committed whole.

A writer holds the index's lock for its whole run. Encoded segments are staged (written, then
named under "staging" in the manifest) so that a crash loses at most one segment's work and
the next build reuses the rest. A commit writes the rows, an ANN index per kind and the skipped
list, replaces the manifest, and only then deletes files that neither the new generation nor
the one before it names, so that a reader opening the previous generation still finds its files.
"""
from __future__ import annotations

import fcntl
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from itm.common.durable import write_durably
from itm.common.errors import IndexBusyError, IndexDamagedError, ItmWarning
from itm.models.artifacts import copy_card
from itm.models.checkpoint import file_sha256
from itm.models.identity import ModelIdentity

from . import store
from .check import MARKER, digests_of, full_damage, marked
from .manifest import KINDS, MANIFEST, AnnInfo, Manifest, RerankerInfo, load_manifest, write_manifest


@contextmanager
def locked(index_dir: Path, wait: bool = True) -> Iterator[None]:
    """Hold the index's writer lock for a build or a compaction. While another writer holds it, wait for it
    (saying so once, as an ItmWarning), or with `wait=False` refuse at once; the lock dies with its process."""
    with open(Path(index_dir) / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = f"another build or compaction is writing to {index_dir}"
            if not wait:
                raise IndexBusyError(f"{busy}; try again when it has finished, or leave out --no-wait") from None
            warnings.warn(f"{busy}; waiting for it to finish (--no-wait: refuse instead)", ItmWarning, stacklevel=3)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


class Writer:
    """The one writer of an index directory; use it inside `locked(index_dir)`.

    >>> with locked(idx):
    ...     w = Writer(idx)
    ...     w.commit(rows, w.skipped, next_id=w.manifest.next_id)
    """

    def __init__(self, index_dir: Path):
        self.index_dir = Path(index_dir)
        # None until `start` for a new index; read from its copy when manifest.json is damaged (the commit rewrites it)
        self.manifest, own = load_manifest(self.index_dir)
        # files found missing, cut short or (when the last itm-index check named them) changed: `repair` drops them
        self.damage = ([(MANIFEST, own)] if own else []) + \
            (full_damage(self.manifest, self.index_dir, marked(self.index_dir)) if self.manifest else [])
        bad = {name for name, _ in self.damage}
        self.arrays = store.SegmentArrays(self.index_dir, self.store_dtype)
        self.sizes = {**self.manifest.segments, **self.manifest.staging} if self.manifest else {}  # rows by segment
        self.rows: pa.Table = store.read_table(self.index_dir / self.manifest.rows, store.ROW_SCHEMA) \
            if self.manifest and self.manifest.rows not in bad else store.ROW_SCHEMA.empty_table()
        self.skipped: pa.Table = store.read_table(self.index_dir / self.manifest.skipped, store.SKIP_SCHEMA) \
            if self.manifest and self.manifest.skipped not in bad else store.SKIP_SCHEMA.empty_table()

    def repair(self) -> list[str]:
        """Leave out what the damaged files held, so that this build encodes it again and its commit writes
        the index's files anew; returns the sources whose items were left out, to be built again."""
        bad = {name for name, _ in self.damage}
        m = self.manifest
        segments = {name.split(".", 1)[0] for name in bad if name.startswith("seg-")}
        keep = ~np.isin(store.categories(self.rows.column("segment")), sorted(segments))
        lost = set(self.rows.filter(pa.array(~keep)).column("source").to_pylist()) if len(self.rows) else set()
        lost = {os.fsdecode(s) for s in lost} | (set(m.listings) if m.rows in bad else set())
        self.rows = self.rows.filter(pa.array(keep))
        if m.reranker and {m.reranker.file, m.reranker.config_file} & bad:
            self._copy_reranker(m.reranker)
        staging = {s: n for s, n in m.staging.items() if s not in segments}
        if m.rows in bad:  # which rows were live is lost; the whole segments stay, reusable by content hash
            staging.update({s: n for s, n in m.segments.items() if s not in segments})
        self.manifest = replace(m, staging=staging, segments={} if m.rows in bad else m.segments,
                                listings={k: v for k, v in m.listings.items() if k not in lost})
        self.sizes = {s: n for s, n in self.sizes.items() if s not in segments}
        return sorted(lost)

    def _copy_reranker(self, reranker: RerankerInfo) -> None:
        """The index's copy of its reranker, again from where it came, if that still holds the same weights."""
        src = Path(reranker.source)
        if not src.is_file() or file_sha256(src) != reranker.sha256:
            raise IndexDamagedError(f"{self.index_dir / reranker.file} is damaged and {src} no longer holds the "
                                    "reranker it was copied from; build the index again into a new --index folder")
        for source, name in ((src.with_suffix(".json"), reranker.config_file), (src, reranker.file)):
            data = source.read_bytes()
            write_durably(self.index_dir / name, lambda f: f.write(data))
        copy_card(src, self.index_dir / reranker.file)  # what it was trained for, for itm-index info

    @property
    def store_dtype(self) -> str | None:
        """How the rerank store keeps features (RerankerInfo.store_dtype); None: float16, or no store."""
        return self.manifest.reranker.store_dtype if self.manifest and self.manifest.reranker else None

    def start(self, model: ModelIdentity, reranker: RerankerInfo | None) -> None:
        """Generation 0 of a new index: no rows yet, so that staged segments have a manifest to live in."""
        manifest = Manifest(model=model, reranker=reranker)
        self.arrays = store.SegmentArrays(self.index_dir, reranker.store_dtype if reranker else None)
        store.write_table(self.index_dir / manifest.rows, self.rows)
        store.write_table(self.index_dir / manifest.skipped, self.skipped)
        if reranker is not None:  # the index carries the reranker its rerank store was made by
            self._copy_reranker(reranker)
        write_manifest(self.index_dir, manifest)
        self.manifest = manifest

    def staged_hashes(self) -> dict[str, list[str]]:
        """The content hashes of each staged segment, in row order (a crashed build's work, to reuse)."""
        return {seg: store.read_table(self.index_dir / f"{seg}.parquet", store.SEGMENT_SCHEMA)
                .column("hash").to_pylist() for seg in self.manifest.staging}

    def write_segment(self, rows: list[dict], emb: np.ndarray, tok: np.ndarray | None = None,
                      mask: np.ndarray | None = None, precision: str | None = None) -> str:
        """Write a segment that no manifest names yet; returns its name."""
        name = store.new_segment_name()
        store.write_segment(self.index_dir, name, pa.Table.from_pylist(rows, schema=store.SEGMENT_SCHEMA),
                            emb, tok, mask, self.store_dtype or "fp16", precision)
        self.sizes[name] = len(rows)
        return name

    def stage(self, rows: list[dict], emb: np.ndarray, tok: np.ndarray | None = None,
              mask: np.ndarray | None = None, precision: str | None = None) -> str:
        """Write a segment and commit it as staging: invisible to readers, reusable after a crash."""
        name = self.write_segment(rows, emb, tok, mask, precision)
        self.adopt(name, len(rows))
        return name

    def adopt(self, name: str, n: int) -> None:
        """Stage a segment of `n` rows that another process wrote (store.write_segment: its parquet file last)."""
        self.sizes[name] = n
        self.manifest = replace(self.manifest, staging={**self.manifest.staging, name: n})
        write_manifest(self.index_dir, self.manifest)

    def commit(self, rows: pa.Table, skipped: pa.Table, next_id: int, faiss_factory: str | None = None,
               ann: dict[str, AnnInfo] | None = None, recall_target: float | None = None,
               listings: dict[str, dict] | None = None) -> Manifest:
        """Commit the next generation: `rows` (store.ROW_SCHEMA) and `skipped` (store.SKIP_SCHEMA).

        An ANN index per kind is built over the rows (with `faiss_factory`, else the index's own
        choice; an IVF index on disk, probing enough lists to reach `recall_target`), unless `ann`
        holds indexes that stay valid: the same vectors in the same row order. `listings` replaces
        the sources' listing fingerprints (indexer/listing.py); None keeps them, for a commit that
        leaves every source's rows as they were. Returns the new manifest.
        """
        old = self.manifest
        gen = old.generation + 1
        factory = faiss_factory or old.faiss_factory
        kinds, segments = (store.categories(rows.column(name)) for name in ("kind", "segment"))
        manifest = replace(
            old, generation=gen, rows=f"rows-g{gen}.parquet", skipped=f"skipped-g{gen}.parquet",
            ann=self._build_ann(kinds, segments, store.integers(rows.column("offset")), factory, gen, recall_target)
            if ann is None else ann,
            segments={s: self.sizes[s] for s in sorted(set(segments))}, staging={},
            next_id=next_id,
            counts={kind: int((kinds == kind).sum()) for kind in KINDS}, faiss_factory=factory,
            updated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), listings=old.listings if listings is None else listings)
        store.write_table(self.index_dir / manifest.rows, rows)
        store.write_table(self.index_dir / manifest.skipped, skipped)
        manifest = replace(manifest, digests=digests_of(manifest, self.index_dir, old.digests))
        write_manifest(self.index_dir, manifest)
        store.collect_garbage(self.index_dir, keep=(manifest, old))
        (self.index_dir / MARKER).unlink(missing_ok=True)  # the files a check found damaged are named no more
        self.damage = []
        self.manifest, self.rows, self.skipped = manifest, rows, skipped
        return manifest

    def _build_ann(self, kinds: np.ndarray, segments: np.ndarray, offsets: np.ndarray, factory: str | None,
                   gen: int, recall_target: float | None) -> dict[str, AnnInfo]:
        """An ANN index per kind over the rows, given as their kinds, segments and offsets (row order)."""
        from .ann import RECALL_TARGET, choose_factory  # faiss, which a build that commits nothing never needs
        from .ivf_disk import is_ivf

        target = recall_target or RECALL_TARGET
        ann = {}
        for kind in KINDS:
            sel = kinds == kind
            if not sel.any():
                continue
            file = f"ann-{kind}-g{gen}.faiss"
            used = factory or choose_factory(int(sel.sum()), self.manifest.model.embed_dim, target)
            build = self._on_disk if is_ivf(used) else self._in_memory
            ann[kind] = build(segments[sel], offsets[sel], used, file, target)
        return ann

    def _in_memory(self, segments: np.ndarray, offsets: np.ndarray, factory: str, file: str,
                   recall_target: float) -> AnnInfo:
        from .ann import build_ann, measured_recall

        vectors = self.arrays.gather(segments, offsets, "emb")
        index, used = build_ann(vectors, factory)
        recall = 1.0 if used == "Flat" else measured_recall(index, vectors)
        store.write_ann(self.index_dir / file, index)
        return AnnInfo(file=file, factory=used, metric="inner_product", dim=int(vectors.shape[1]),
                       ntotal=int(index.ntotal), recall_at_10=recall)

    def _on_disk(self, segments: np.ndarray, offsets: np.ndarray, factory: str, file: str,
                 recall_target: float) -> AnnInfo:
        """An IVF index filled shard by shard from the memory-mapped segments, its lists merged on disk."""
        from . import ivf_disk

        n, shard = len(segments), ivf_disk.SHARD_ROWS
        rng = np.random.default_rng(0)

        def blocks():
            for start in range(0, n, shard):
                yield self.arrays.gather(segments[start:start + shard], offsets[start:start + shard], "emb")

        pick = np.sort(rng.choice(n, size=min(n, ivf_disk.train_size(factory, n)), replace=False))
        sample = rng.permutation(self.arrays.gather(segments[pick], offsets[pick], "emb"))  # random order
        built = ivf_disk.build_on_disk(blocks, sample, factory, self.index_dir / file, recall_target)
        store.write_ann(self.index_dir / file, built.index)
        return AnnInfo(file=file, factory=factory, metric="inner_product", dim=int(sample.shape[1]),
                       ntotal=int(built.index.ntotal), recall_at_10=built.recall_at_10, ivfdata=built.ivfdata.name,
                       nprobe=built.nprobe, recall_target=recall_target)
