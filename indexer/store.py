"""The index on disk: immutable data files named by one atomically replaced manifest.

Layout of an index directory:

    manifest.json              format, generation, model, store spec, the files below
    seg-<id>.parquet           rows of one segment (one kind: image or text), as encoded
    seg-<id>.emb.npy           (n, E) float32 unit embeddings of those rows
    seg-<id>.tok.npy           (n, L, T, D) float16 rerank-store token features (when a reranker is set)
    seg-<id>.mask.npy          (n, T) bool token mask (text segments with a store)
    rows-g<N>.parquet          the live rows of generation N, each pointing at (segment, offset)
    ann-<kind>-g<N>.faiss      one FAISS index per kind over the live rows of that kind, in row order
    skipped-g<N>.parquet       corpus items that could not be used, with the reason

A commit writes new files and then replaces manifest.json with os.replace, so a reader
sees either the old snapshot or the new one. Segments written during a build are listed
under "staging" until the build finishes: readers ignore them, the next build reuses them.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import IndexFormatError, IndexNotFoundError

# Format history:
#   1: first format.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("image", "text")

SEGMENT_SCHEMA = pa.schema([
    ("kind", pa.string()),
    ("source", pa.string()),  # the folder or text file given to `build`
    ("path", pa.string()),  # image file, or the text file a text came from
    ("text", pa.string()),  # the text itself (null for images)
    ("source_id", pa.string()),  # id column value or line number within a text file
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("hash", pa.string()),  # blake2b of the file bytes or of the text
])
ROW_SCHEMA = pa.schema([("id", pa.int64()), *SEGMENT_SCHEMA, ("segment", pa.string()), ("offset", pa.int64())])
SKIP_SCHEMA = pa.schema([("source", pa.string()), ("path", pa.string()), ("reason", pa.string())])


def default_index_dir() -> Path:
    """ITM_INDEX, else the per-user data directory ($XDG_DATA_HOME/itm/index)."""
    if os.environ.get("ITM_INDEX"):
        return Path(os.environ["ITM_INDEX"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "itm" / "index"


def read_manifest(index_dir: Path) -> dict[str, Any] | None:
    path = Path(index_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"{path} is corrupt ({e}); rebuild the index into a new --index directory") from None
    fmt = manifest.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise IndexFormatError(
            f"index at {index_dir} has format {fmt}, newer than this itm understands ({FORMAT_VERSION}); "
            "upgrade itm or pass --index for another index")
    return manifest


def write_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = Path(index_dir) / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(index_dir) / MANIFEST)
    _fsync_dir(index_dir)


def new_segment_name() -> str:
    return f"seg-{uuid.uuid4().hex[:16]}"


def write_segment(index_dir: Path, name: str, rows: pa.Table, emb: np.ndarray,
                  tok: np.ndarray | None = None, mask: np.ndarray | None = None) -> None:
    """Write one immutable segment; all its files are durable before any manifest names them."""
    d = Path(index_dir)
    _durable(d / f"{name}.emb.npy", lambda f: np.save(f, np.ascontiguousarray(emb, np.float32)))
    if tok is not None:
        _durable(d / f"{name}.tok.npy", lambda f: np.save(f, np.ascontiguousarray(tok, np.float16)))
    if mask is not None:
        _durable(d / f"{name}.mask.npy", lambda f: np.save(f, np.ascontiguousarray(mask, bool)))
    _durable(d / f"{name}.parquet", lambda f: pq.write_table(rows.cast(SEGMENT_SCHEMA), f))


def write_table(path: Path, table: pa.Table) -> None:
    _durable(path, lambda f: pq.write_table(table, f))


def write_ann(path: Path, index: faiss.Index) -> None:
    _durable(path, lambda f: f.write(faiss.serialize_index(index).tobytes()))


def read_ann(path: Path) -> faiss.Index:
    return faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))


def collect_garbage(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Delete data files that the current manifest no longer names (best effort)."""
    keep = referenced_files(manifest)
    for p in Path(index_dir).iterdir():
        if p.name != MANIFEST and p.name not in keep and (p.name.startswith(("seg-", "rows-", "ann-", "skipped-"))
                                                          or p.name.endswith(".tmp")):
            try:
                p.unlink()
            except OSError:
                pass


def referenced_files(manifest: dict[str, Any]) -> set[str]:
    names = {manifest["rows"], manifest["skipped"]}
    names |= {a["file"] for a in manifest["ann"].values()}
    for seg in [*manifest["segments"], *manifest.get("staging", [])]:
        names |= {f"{seg}.parquet", f"{seg}.emb.npy", f"{seg}.tok.npy", f"{seg}.mask.npy"}
    if manifest.get("reranker"):
        names.add(manifest["reranker"]["file"])
        names.add(Path(manifest["reranker"]["file"]).with_suffix(".json").name)
    return names


@dataclass
class Snapshot:
    """One committed generation of an index, opened read-only; segment arrays are memory-mapped."""

    index_dir: Path
    manifest: dict[str, Any]
    rows: pa.Table
    _arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def open(cls, index_dir: Path) -> "Snapshot":
        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        if manifest is None:
            raise IndexNotFoundError(
                f"no index at {index_dir}; build one with `itm-index build FOLDER` "
                "(or pass --index / set ITM_INDEX to use another)")
        return cls(index_dir, manifest, pq.read_table(index_dir / manifest["rows"]))

    def array(self, segment: str, part: str) -> np.ndarray:
        key = f"{segment}.{part}"
        if key not in self._arrays:
            self._arrays[key] = np.load(self.index_dir / f"{key}.npy", mmap_mode="r")
        return self._arrays[key]

    def gather(self, row_ids: np.ndarray, part: str) -> np.ndarray:
        """Stack one array part ("emb", "tok", "mask") for the given row positions, in order."""
        segs = self.rows.column("segment").to_numpy(zero_copy_only=False)[row_ids]
        offs = self.rows.column("offset").to_numpy()[row_ids]
        first = self.array(segs[0], part) if len(segs) else None
        if first is None:
            return np.zeros((0,), np.float32)
        out = np.empty((len(row_ids), *first.shape[1:]), first.dtype)
        for seg in np.unique(segs):
            sel = segs == seg
            out[sel] = self.array(seg, part)[offs[sel]]
        return out

    def kind_rows(self, kind: str) -> np.ndarray:
        """Row positions of one kind, in the order the FAISS index of that kind holds them."""
        kinds = self.rows.column("kind").to_numpy(zero_copy_only=False)
        return np.flatnonzero(kinds == kind)

    def skipped(self) -> pa.Table:
        return pq.read_table(self.index_dir / self.manifest["skipped"])


def _durable(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
