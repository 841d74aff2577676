"""build_index: embed a folder of images or a file of texts into an index, incrementally."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from . import store
from .ann import build_ann, measured_recall
from .encoder import DualEncoder
from .errors import CorpusError, DecodeError, ItmError, ModelMismatchError
from .images import DEFAULT_MAX_PIXELS
from .models import ModelSpec, resolve_model
from .images import read_file
from .parallel import ordered_map
from .store_encoder import LoadedStoreEncoder, load_store_encoder
from .scan import FileEntry, is_text_corpus, read_texts, scan_images

SkipFn = Callable[[str, str], None]


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Prepared:
    entry: FileEntry
    hash: str | None = None
    pixels: torch.Tensor | None = None  # (3, S, S), None when the embedding is reused or the item skipped
    error: str | None = None


def prepare_image(entry: FileEntry, encoder: DualEncoder, max_pixels: int, known: Callable[[str], bool]) -> Prepared:
    """Read once, hash, and decode only when no embedding exists for these bytes yet."""
    try:
        data = read_file(Path(entry.path))
    except DecodeError as e:
        return Prepared(entry, error=str(e))
    h = content_hash(data)
    if known(h):
        return Prepared(entry, h)
    try:
        return Prepared(entry, h, encoder.load_pixels(data, max_pixels))
    except DecodeError as e:
        return Prepared(entry, h, error=str(e))


@dataclass
class BuildOptions:
    batch_size: int = 64  # items per forward pass
    workers: int = max(1, (os.cpu_count() or 1))  # decoding threads
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (GPU)
    exclude: Sequence[str] = ()  # globs relative to the folder
    include_hidden: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard
    faiss_factory: str | None = None  # None: chosen from corpus size (or kept from the last build)
    text_column: str | None = None
    id_column: str | None = None
    commit_every: int = 2048  # items per staged segment: what an interruption can lose at most
    progress: bool = False  # show a tqdm bar on stderr


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


def build_index(source: Path | str, index_dir: Path | str | None = None, model: ModelSpec | None = None,
                options: BuildOptions | None = None, on_skip: SkipFn | None = None) -> BuildReport:
    """Add a folder of images or a text corpus to an index, embedding only what changed.

    >>> build_index("photos/", "idx/", resolve_model("itm-tiny", "random")).added
    12
    """
    t0 = time.perf_counter()
    options = options or BuildOptions()
    source = Path(source).expanduser().resolve()
    if not source.exists():
        raise CorpusError(f"{source} does not exist; pass a folder of images or a text file")
    index_dir = Path(index_dir) if index_dir else store.default_index_dir()
    index_dir.mkdir(parents=True, exist_ok=True)
    with _locked(index_dir):
        old = store.read_manifest(index_dir)
        spec = model or spec_from_manifest(old, index_dir) or resolve_model()
        encoder = DualEncoder.load(spec, options.device, options.precision)
        projector = load_store_encoder(spec.reranker, encoder) if spec.reranker else None
        info = model_info(spec, encoder)
        reranker = _reranker_info(spec, projector)
        if old is not None:
            check_model(old, info, reranker, index_dir)
        job = _Job(index_dir, old, encoder, projector, options, on_skip, info, reranker)
        if is_text_corpus(source):
            job.run_texts(source)
        elif source.is_dir() or source.is_file():
            job.run_images(source)
        manifest = job.commit_final(source)
    counts = manifest["counts"]
    return BuildReport(index_dir, job.added, job.updated, job.removed, job.unchanged, len(job.skips),
                       job.reused, counts["image"], counts["text"], time.perf_counter() - t0)


def model_info(spec: ModelSpec, encoder: DualEncoder) -> dict[str, Any]:
    """The model identity a manifest records, and that queries are checked against."""
    return {**encoder.identity, "name": spec.name,
            "checkpoint": str(Path(spec.checkpoint).resolve()) if spec.checkpoint and not spec.name else None}


def model_label(info: dict[str, Any]) -> str:
    weights = f"checkpoint {info['checkpoint_sha256'][:12]}" if info.get("checkpoint_sha256") else info["pretrained"]
    return f"{info['name']} ({info['arch']}/{weights})" if info.get("name") else f"{info['arch']}/{weights}"


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("arch", "pretrained", "checkpoint_sha256", "embed_dim")
    return all(a.get(k) == b.get(k) for k in keys)


def check_model(manifest: dict[str, Any], info: dict[str, Any], reranker: dict | None, index_dir: Path) -> None:
    if not same_model(manifest["model"], info):
        raise ModelMismatchError(
            f"index at {index_dir} was built with {model_label(manifest['model'])}, not {model_label(info)}; "
            "pass --index for another index, or delete it to rebuild")
    old_sha = (manifest.get("reranker") or {}).get("sha256")
    new_sha = (reranker or {}).get("sha256")
    if old_sha != new_sha:
        raise ModelMismatchError(
            f"index at {index_dir} holds a rerank store for reranker {str(old_sha)[:12]}, not "
            f"{str(new_sha)[:12]}; pass --index for another index, or delete it to rebuild")


def spec_from_manifest(manifest: dict | None, index_dir: Path) -> ModelSpec | None:
    """Later builds of an index default to the model it was built with."""
    if manifest is None:
        return None
    m = manifest["model"]
    if m.get("name"):
        return resolve_model(m["name"])
    reranker = index_dir / manifest["reranker"]["file"] if manifest.get("reranker") else None
    return resolve_model(m["arch"], m.get("pretrained"), m.get("checkpoint"), reranker)


def _reranker_info(spec: ModelSpec, projector: LoadedStoreEncoder | None) -> dict | None:
    if projector is None:
        return None
    return {"sha256": projector.sha256, "source": str(spec.reranker), "file": f"reranker-{projector.sha256[:16]}.safetensors",
            "image_shape": list(projector.image_shape), "text_shape": list(projector.text_shape)}


@contextmanager
def _locked(index_dir: Path) -> Iterator[None]:
    with open(index_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ItmError(f"another build is writing to {index_dir}; wait for it to finish") from None
        yield


@dataclass
class _Segment:
    """Encoded items waiting to be written as one segment."""
    kind: str
    rows: list[dict] = field(default_factory=list)
    emb: list[np.ndarray] = field(default_factory=list)
    tok: list[np.ndarray] = field(default_factory=list)
    mask: list[np.ndarray] = field(default_factory=list)


class _Pending:
    """Items waiting for a forward pass; full batches are encoded, large segments staged."""

    def __init__(self, job: "_Job", kind: str, encode: Callable[[list, _Segment], None]):
        self.job, self.encode = job, encode
        self.batch: list = []
        self.seg = _Segment(kind)

    def add(self, item) -> None:
        self.batch.append(item)
        if len(self.batch) >= self.job.opt.batch_size:
            self.encode(self.batch, self.seg)
            self.batch = []
            self.seg = self.job._maybe_stage(self.seg)

    def close(self) -> None:
        if self.batch:
            self.encode(self.batch, self.seg)
        self.job._stage(self.seg)


class _Job:
    def __init__(self, index_dir, old, encoder, projector, options, on_skip, info, reranker):
        self.index_dir, self.old, self.encoder, self.projector = index_dir, old, encoder, projector
        self.opt, self.on_skip, self.info, self.reranker = options, on_skip, info, reranker
        self.old_rows = pq.read_table(index_dir / old["rows"]).to_pylist() if old else []
        self.staging: list[str] = list(old.get("staging", [])) if old else []
        self.known: dict[str, tuple[str, int]] = {}  # content hash -> (segment, offset)
        for seg in self.staging:
            for i, r in enumerate(pq.read_table(index_dir / f"{seg}.parquet").to_pylist()):
                self.known.setdefault(r["hash"], (seg, i))
        for r in self.old_rows:
            self.known.setdefault(r["hash"], (r["segment"], r["offset"]))
        self.kept: list[dict] = []  # rows of this source carried over unchanged
        self.new: list[dict] = []  # rows added or updated, resolved to a segment at commit
        self.skips: list[dict] = []
        self.in_flight: set[str] = set()
        self.added = self.updated = self.removed = self.unchanged = self.reused = 0

    # ---- images -------------------------------------------------------------------------
    def run_images(self, root: Path) -> None:
        mine = {r["path"]: r for r in self.old_rows if r["source"] == str(root)}
        seen: set[str] = set()
        todo: list[FileEntry] = []
        for entry in scan_images(root, exclude=self.opt.exclude, include_hidden=self.opt.include_hidden,
                                 on_skip=lambda p, why: self._skip(root, p, why)):
            key = str(entry.path)
            seen.add(key)
            row = mine.get(key)
            if row is not None and row["size"] == entry.size and row["mtime_ns"] == entry.mtime_ns:
                self.kept.append(row)
                self.unchanged += 1
            else:
                todo.append(entry)
        self.removed += len(set(mine) - seen)
        known = self.known.__contains__

        def work(entry: FileEntry) -> Prepared:
            return prepare_image(entry, self.encoder, self.opt.max_pixels, known)

        pending = _Pending(self, "image", self._encode_images)
        bar = tqdm(total=len(todo), unit="img", disable=not self.opt.progress, desc="embedding", smoothing=0.1)
        for item in ordered_map(work, todo, self.opt.workers, prefetch=4 * self.opt.batch_size):
            bar.update(1)
            if item.error is not None:
                self._skip(root, item.entry.path, item.error)
                continue
            e = item.entry
            row = {"kind": "image", "source": str(root), "path": str(e.path), "text": None,
                   "source_id": None, "size": e.size, "mtime_ns": e.mtime_ns, "hash": item.hash}
            if self._needs_encoding(row, is_update=str(e.path) in mine):
                pending.add(item)
        pending.close()
        bar.close()

    def _encode_images(self, batch: list[Prepared], seg: _Segment) -> None:
        pixels = torch.stack([p.pixels for p in batch])  # (B, 3, S, S)
        layers = self.projector.image_layers if self.projector else ()
        out = self.encoder.encode_images(pixels, layers)
        seg.emb.append(out.embeddings.cpu().numpy())
        if self.projector:
            seg.tok.append(self.projector.images(out.tokens, out.grid))
        seg.rows.extend({"hash": p.hash, "kind": "image", "source": None, "path": str(p.entry.path), "text": None,
                         "source_id": None, "size": p.entry.size, "mtime_ns": p.entry.mtime_ns} for p in batch)

    # ---- texts --------------------------------------------------------------------------
    def run_texts(self, path: Path) -> None:
        st = path.stat()
        mine = {r["source_id"]: r for r in self.old_rows if r["source"] == str(path)}
        if mine and all(r["size"] == st.st_size and r["mtime_ns"] == st.st_mtime_ns for r in mine.values()):
            self.kept.extend(mine.values())
            self.unchanged += len(mine)
            return
        items = read_texts(path, text_column=self.opt.text_column, id_column=self.opt.id_column,
                           on_skip=lambda p, why: self._skip(path, p, why))
        pending = _Pending(self, "text", self._encode_texts)
        seen: set[str] = set()
        bar = tqdm(total=len(items), unit="text", disable=not self.opt.progress, desc="embedding")
        for item in items:
            bar.update(1)
            if item.source_id in seen:
                self._skip(path, f"{path}:{item.source_id}", "duplicate id")
                continue
            seen.add(item.source_id)
            h = content_hash(item.text.encode())
            row = {"kind": "text", "source": str(path), "path": str(path), "text": item.text,
                   "source_id": item.source_id, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "hash": h}
            old = mine.get(item.source_id)
            if old is not None and old["hash"] == h:
                self.kept.append({**old, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
                self.unchanged += 1
            elif self._needs_encoding(row, is_update=old is not None):
                pending.add(row)
        pending.close()
        bar.close()
        self.removed += len(set(mine) - seen)

    def _encode_texts(self, batch: list[dict], seg: _Segment) -> None:
        layers = self.projector.text_layers if self.projector else ()
        out = self.encoder.encode_texts([r["text"] for r in batch], layers)
        seg.emb.append(out.embeddings.cpu().numpy())
        if self.projector:
            tok, mask = self.projector.texts(out.tokens, out.mask)
            seg.tok.append(tok)
            seg.mask.append(mask)
        seg.rows.extend(batch)

    def _needs_encoding(self, row: dict, is_update: bool) -> bool:
        """Count an added or updated row; False when an embedding for its content exists or is on its way."""
        self.updated += is_update
        self.added += not is_update
        self.new.append(row)
        if row["hash"] in self.known or row["hash"] in self.in_flight:
            self.reused += 1
            return False
        self.in_flight.add(row["hash"])
        return True

    # ---- commits ------------------------------------------------------------------------
    def _skip(self, source: Path, path, reason: str) -> None:
        self.skips.append({"source": str(source), "path": str(path), "reason": reason})
        if self.on_skip:
            self.on_skip(str(path), reason)

    def _maybe_stage(self, seg: _Segment) -> _Segment:
        if sum(len(e) for e in seg.emb) < self.opt.commit_every:
            return seg
        self._stage(seg)
        return _Segment(seg.kind)

    def _stage(self, seg: _Segment) -> None:
        """Write a segment and commit it as staging: invisible to readers, reusable after a crash."""
        if not seg.rows:
            return
        name = store.new_segment_name()
        store.write_segment(
            self.index_dir, name, pa.Table.from_pylist(seg.rows, schema=store.SEGMENT_SCHEMA), np.concatenate(seg.emb),
            np.concatenate(seg.tok) if seg.tok else None, np.concatenate(seg.mask) if seg.mask else None)
        for i, r in enumerate(seg.rows):
            self.known.setdefault(r["hash"], (name, i))
        self.staging.append(name)
        base = self.old or self._empty_manifest()
        store.write_manifest(self.index_dir, {**base, "staging": self.staging})
        if self.old is None:
            self.old = base

    def _empty_manifest(self) -> dict[str, Any]:
        """Generation 0: an index with no rows, so that staged segments have a manifest to live in."""
        rows, skipped = "rows-g0.parquet", "skipped-g0.parquet"
        store.write_table(self.index_dir / rows, store.ROW_SCHEMA.empty_table())
        store.write_table(self.index_dir / skipped, store.SKIP_SCHEMA.empty_table())
        self._copy_reranker()
        return {"format": store.FORMAT_VERSION, "generation": 0, "model": self.info, "reranker": self.reranker,
                "rows": rows, "skipped": skipped, "ann": {}, "segments": [], "staging": [], "next_id": 0,
                "counts": {"image": 0, "text": 0}, "faiss_factory": None}

    def _copy_reranker(self) -> None:
        if self.reranker:
            src = Path(self.reranker["source"])
            dst = self.index_dir / self.reranker["file"]
            if not dst.exists():
                shutil.copyfile(src.with_suffix(".json"), dst.with_suffix(".json"))
                shutil.copyfile(src, dst)

    def commit_final(self, source: Path) -> dict[str, Any]:
        base = self.old or self._empty_manifest()
        gen = base["generation"] + 1
        next_id = base["next_id"]
        rows = [r for r in self.old_rows if r["source"] != str(source)] + self.kept
        for r in self.new:
            seg, off = self.known[r["hash"]]
            rows.append({**r, "id": next_id, "segment": seg, "offset": off})
            next_id += 1
        table = pa.Table.from_pylist(rows, schema=store.ROW_SCHEMA)
        skipped = [s for s in (pq.read_table(self.index_dir / base["skipped"]).to_pylist() if self.old else [])
                   if s["source"] != str(source)] + self.skips
        snapshot = store.Snapshot(self.index_dir, base, table)
        factory = self.opt.faiss_factory or base.get("faiss_factory")
        ann, counts = {}, {}
        for kind in store.KINDS:
            ids = snapshot.kind_rows(kind)
            counts[kind] = len(ids)
            if len(ids) == 0:
                continue
            vectors = snapshot.gather(ids, "emb")
            index, used = build_ann(vectors, factory)
            recall = 1.0 if used == "Flat" else measured_recall(index, vectors)
            ann[kind] = {"file": f"ann-{kind}-g{gen}.faiss", "factory": used, "metric": "inner_product",
                         "dim": int(vectors.shape[1]), "ntotal": int(index.ntotal), "recall_at_10": recall}
            store.write_ann(self.index_dir / ann[kind]["file"], index)
        manifest = {**base, "generation": gen, "rows": f"rows-g{gen}.parquet", "skipped": f"skipped-g{gen}.parquet",
                    "ann": ann, "segments": sorted(set(table.column("segment").to_pylist())), "staging": [],
                    "next_id": next_id, "counts": counts, "faiss_factory": self.opt.faiss_factory or base.get("faiss_factory"),
                    "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        store.write_table(self.index_dir / manifest["rows"], table)
        store.write_table(self.index_dir / manifest["skipped"], pa.Table.from_pylist(skipped, schema=store.SKIP_SCHEMA))
        self._copy_reranker()
        store.write_manifest(self.index_dir, manifest)
        store.collect_garbage(self.index_dir, manifest)
        return manifest
