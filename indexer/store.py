"""The index on disk: immutable data files named by one atomically replaced manifest.

Layout of an index directory:

    manifest.json              format, generation, model, store spec, the files below (indexer/manifest.py)
    seg-<id>.parquet           rows of one segment (one kind: image or text), as encoded
    seg-<id>.emb.npy           (n, E) float32 unit embeddings of those rows
    seg-<id>.tok.npy           (n, L, T, D) float16 rerank-store token features (when a reranker is set)
    seg-<id>.tok8.npy          ... or, in an index whose store is int8, (n, L, T, D) int8 token features
    seg-<id>.tokscale.npy      and (n, L, T) float16 scales: a feature is tok8 x its token's scale
    seg-<id>.mask.npy          (n, T) bool token mask (text segments with a store)
    rows-g<N>.parquet          the live rows of generation N, each pointing at (segment, offset)
    ann-<kind>-g<N>.faiss      one FAISS index per kind over the live rows of that kind, in row order
    ann-<kind>-g<N>.ivfdata    an IVF index's inverted lists, memory-mapped by searches (indexer/ivf_disk.py)
    skipped-g<N>.parquet       corpus items that could not be used, with the reason
    reranker-<sha>.safetensors the fusion reranker whose store encoder made the rerank store (+ .json)
    .lock                      held by the one build writing to the index (indexer/commit.py)

A commit writes new files and then replaces manifest.json with os.replace, so a reader
sees either the old snapshot or the new one; files that neither the new generation nor the
one before it names are deleted after the replace, and a reader maps every file of its
generation when it opens it (Snapshot). Segments written during a build are
listed under "staging" until the build finishes: readers ignore them, the next build
reuses them.
"""
from __future__ import annotations

import functools
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from itm.common.durable import is_temporary, write_durably
from itm.common.errors import IndexDamagedError, IndexNotFoundError, ItmError

from .check import describe, full_damage, quick_damage
from .manifest import KINDS, MANIFEST, AnnInfo, Manifest, read_manifest

__all__ = ["KINDS", "ROW_SCHEMA", "SEGMENT_SCHEMA", "SKIP_SCHEMA", "SegmentArrays", "Snapshot", "collect_garbage",
           "new_segment_name", "read_table", "write_ann", "write_segment",
           "write_table"]

# Paths are stored as bytes, exactly as the file system gives them (os.fsencode), so that names
# that are not UTF-8 survive; os.fsdecode turns them back into str paths that open the same file.
SEGMENT_SCHEMA = pa.schema([
    ("kind", pa.string()),
    ("source", pa.binary()),  # the folder or text file given to `build`
    ("path", pa.binary()),  # image file, or the text file a text came from
    ("text", pa.string()),  # the text itself (null for images)
    ("source_id", pa.string()),  # id column value or line number within a text file
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("hash", pa.string()),  # blake2b of the file bytes or of the text
    # what users filter images on, read from the file's header (indexer/metadata.py); null for texts, and
    # for images of a format-2 index until a build or compaction migrates it (indexer/migrate.py)
    ("width", pa.int32()),  # pixels, as the image is shown (EXIF rotation applied)
    ("height", pa.int32()),
    ("taken", pa.string()),  # EXIF capture time as the camera wrote it (local, no zone): YYYY-MM-DDTHH:MM:SS
    ("camera_make", pa.string()),
    ("camera_model", pa.string()),
    ("gps_lat", pa.float64()),  # decimal degrees, north positive
    ("gps_lon", pa.float64()),  # decimal degrees, east positive
])
ROW_SCHEMA = pa.schema([("id", pa.int64()), *SEGMENT_SCHEMA, ("segment", pa.string()), ("offset", pa.int64())])
SKIP_SCHEMA = pa.schema([("source", pa.binary()), ("path", pa.binary()), ("reason", pa.string())])
PARTS = ("emb", "tok", "mask")  # the arrays of a segment, as seg-<id>.<part>.npy
INT8_TOK = ("tok8", "tokscale")  # the files that hold "tok" in an index whose store is int8
STORE_DTYPES = ("fp16", "int8")  # how the rerank store keeps token features (RerankerInfo.store_dtype)
OPEN_ATTEMPTS = 20  # generations a reader may see committed while it opens one, before it gives up

if TYPE_CHECKING:  # faiss loads when an ANN index is read or written, not for a rebuild with nothing to do
    import faiss


def new_segment_name() -> str:
    return f"seg-{uuid.uuid4().hex[:16]}"


def write_segment(index_dir: Path, name: str, rows: pa.Table, emb: np.ndarray,
                  tok: np.ndarray | None = None, mask: np.ndarray | None = None, store_dtype: str = "fp16",
                  precision: str | None = None) -> None:
    """Write one immutable segment; all its files are durable before any manifest names them (the parquet last).

    `precision` (the encoders' arithmetic: fp32, bf16, int8, ...) is kept in the parquet file's metadata.
    """
    d = Path(index_dir)
    write_durably(d / f"{name}.emb.npy", lambda f: np.save(f, np.ascontiguousarray(emb, np.float32)))
    if tok is not None and store_dtype == "int8":
        q, scale = quantize_int8(tok)
        write_durably(d / f"{name}.tok8.npy", lambda f: np.save(f, q))
        write_durably(d / f"{name}.tokscale.npy", lambda f: np.save(f, scale))
    elif tok is not None:
        write_durably(d / f"{name}.tok.npy", lambda f: np.save(f, np.ascontiguousarray(tok, np.float16)))
    if mask is not None:
        write_durably(d / f"{name}.mask.npy", lambda f: np.save(f, np.ascontiguousarray(mask, bool)))
    table = rows.cast(SEGMENT_SCHEMA)
    if precision is not None:
        table = table.replace_schema_metadata({PRECISION_KEY: precision})
    write_durably(d / f"{name}.parquet", lambda f: pq.write_table(table, f))


PRECISION_KEY = "itm.precision"
UNRECORDED = "unrecorded"  # segments written before the precision was kept


@functools.lru_cache(maxsize=1 << 16)  # segments are immutable and their names never reused
def segment_precision(index_dir: Path, name: str) -> str:
    """The precision a segment's embeddings were made with; UNRECORDED for an older segment."""
    meta = pq.read_schema(Path(index_dir) / f"{name}.parquet").metadata or {}
    return meta.get(PRECISION_KEY.encode(), UNRECORDED.encode()).decode()


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., D) features -> (..., D) int8 and (...,) float16 scales, one per D-vector: x ~ q * scale.

    The scale is rounded to float16 before quantizing, so that quantizing dequantized features
    gives the same bytes again (compaction rewrites segments without losing more).
    """
    x = np.asarray(x, np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float16)  # (...,)
    div = np.where(scale > 0, scale, 1).astype(np.float32)[..., None]
    return np.clip(np.rint(x / div), -127, 127).astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 features and their per-vector scales -> float16 features, as the reranker takes them."""
    return (q.astype(np.float32) * scale.astype(np.float32)[..., None]).astype(np.float16)


def write_table(path: Path, table: pa.Table) -> None:
    write_durably(path, lambda f: pq.write_table(table, f))


def integers(column: pa.ChunkedArray) -> np.ndarray:
    """An integer column without nulls as a numpy array, read from its buffer (see categories)."""
    chunk = column.combine_chunks()
    dtype = np.dtype(chunk.type.to_pandas_dtype())
    if len(chunk) == 0:
        return np.zeros(0, dtype)
    return np.frombuffer(chunk.buffers()[1], dtype)[chunk.offset:chunk.offset + len(chunk)].copy()


def categories(column: pa.ChunkedArray) -> np.ndarray:
    """A string column with few distinct values (kinds, segment names) as a numpy array of str.

    Read from the column's own buffers: pyarrow's to_numpy goes through its pandas layer, and
    importing pandas costs a cold query about a tenth of a second. Only distinct values are decoded.
    """
    chunk = column.combine_chunks()
    if len(chunk) == 0:
        return np.array([], dtype=object)
    _, offsets_buf, data_buf = chunk.buffers()
    wide = pa.types.is_large_string(chunk.type)
    offsets = np.frombuffer(offsets_buf, np.int64 if wide else np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    width = max(1, int(lengths.max()))
    cols = np.arange(width)
    inside = cols[None] < lengths[:, None]  # (N, width)
    padded = np.zeros((len(chunk), width), np.uint8)
    padded[inside] = data[(offsets[:-1, None] + cols[None])[inside]]
    names, which = np.unique(padded.view(f"S{width}").ravel(), return_inverse=True)
    return np.array([n.decode() for n in names], dtype=object)[which]


def read_table(path: Path, schema: pa.Schema) -> pa.Table:
    """A table of `schema`; older formats' text path columns come back as the bytes they encode, and the
    columns they lack (format 2's metadata) as nulls."""
    with pq.ParquetFile(path) as f:  # one file: no dataset layer, which would import pyarrow.compute
        table = f.read()
    if table.schema.equals(schema):
        return table
    missing = [f for f in schema if f.name not in table.schema.names]
    for f in missing:
        table = table.append_column(f.name, pa.nulls(len(table), f.type))
    return table.select(schema.names).cast(schema)  # cast, too, imports pyarrow.compute


def write_ann(path: Path, index: faiss.Index) -> None:
    import faiss

    write_durably(path, lambda f: f.write(faiss.serialize_index(index).tobytes()))


def collect_garbage(index_dir: Path, keep: Iterable[Manifest]) -> None:
    """Delete data files that none of the `keep` manifests names, and leftover temporary files (best effort)."""
    names: set[str] = set()
    for manifest in keep:
        names |= manifest.files()
    for p in Path(index_dir).iterdir():
        data = p.name.startswith(("seg-", "rows-", "ann-", "skipped-", "reranker-"))
        if p.name != MANIFEST and p.name not in names and (data or is_temporary(p.name)):
            try:
                p.unlink()
            except OSError:
                pass


class SegmentArrays:
    """The arrays of an index's segments, memory-mapped on first use; an int8 store is read back as float16."""

    def __init__(self, index_dir: Path, store_dtype: str | None = None):
        self.index_dir = Path(index_dir)
        self.int8 = store_dtype == "int8"
        self._maps: dict[str, np.ndarray] = {}

    def array(self, segment: str, part: str) -> np.ndarray:
        key = f"{segment}.{part}"
        if key not in self._maps:
            self._maps[key] = np.load(self.index_dir / f"{key}.npy", mmap_mode="r")
        return self._maps[key]

    def open(self, segment: str, part: str) -> None:
        """Map the files of one part of a segment now (an int8 "tok" is two files)."""
        for name in (INT8_TOK if part == "tok" and self.int8 else (part,)):
            self.array(segment, name)

    def gather(self, segments: np.ndarray, offsets: np.ndarray, part: str) -> np.ndarray:
        """Stack one part ("emb", "tok", "mask") of the rows at (segments[i], offsets[i]), in order."""
        if part == "tok" and self.int8:
            return dequantize_int8(*(self._gather(segments, offsets, name) for name in INT8_TOK))
        return self._gather(segments, offsets, part)

    def _gather(self, segments: np.ndarray, offsets: np.ndarray, part: str) -> np.ndarray:
        if len(segments) == 0:
            return np.zeros((0,), np.float32)
        first = self.array(segments[0], part)
        out = np.empty((len(segments), *first.shape[1:]), first.dtype)
        for seg in np.unique(segments):
            sel = segments == seg
            out[sel] = self.array(seg, part)[offsets[sel]]
        return out


def _open_on_disk(index_dir: Path, ann: AnnInfo) -> faiss.Index:
    if not (index_dir / ann.ivfdata).is_file():  # faiss would fail later, at the first search
        raise FileNotFoundError(2, "missing", str(index_dir / ann.ivfdata))
    from .ivf_disk import open_on_disk  # faiss, only for an index that has one

    return open_on_disk(index_dir / ann.file, ann.nprobe)


class Snapshot:
    """One committed generation of an index, opened read-only and whole.

    Its rows and skipped list are read and every segment array and ANN file is memory-mapped
    when it opens, so a later commit, which deletes what no recent generation names, cannot
    take anything from it. Should a file vanish while it opens (a writer committed
    twice meanwhile), it opens the newer generation instead.
    """

    def __init__(self, index_dir: Path, manifest: Manifest):
        self.index_dir, self.manifest = Path(index_dir), manifest
        damage = quick_damage(manifest, self.index_dir)  # a stat a file: a file cut short is named, not mapped
        if damage:
            missing = next((name for name, why in damage if why == "is missing"), None)
            if missing is not None:  # gone because a writer committed twice meanwhile? Snapshot.open looks again
                raise FileNotFoundError(2, "missing", str(self.index_dir / missing))
            raise IndexDamagedError(describe(self.index_dir, damage))
        try:
            self._open()
        except (OSError, ValueError, RuntimeError, pa.ArrowException) as e:
            if isinstance(e, FileNotFoundError):
                raise
            damage = full_damage(manifest, self.index_dir)  # what each file holds: which one it could not open
            raise IndexDamagedError(describe(self.index_dir, damage) if damage else
                                    f"index at {self.index_dir} cannot be opened ({e}); run `itm-index check`"
                                    ) from None

    def _open(self) -> None:
        manifest = self.manifest
        self.rows = read_table(self.index_dir / manifest.rows, ROW_SCHEMA)
        self.skipped = read_table(self.index_dir / manifest.skipped, SKIP_SCHEMA)
        self._ann_bytes = {kind: np.memmap(self.index_dir / a.file, dtype=np.uint8, mode="r")
                           for kind, a in manifest.ann.items() if not a.ivfdata}
        self._on_disk = {kind: _open_on_disk(self.index_dir, a) for kind, a in manifest.ann.items() if a.ivfdata}
        self.arrays = SegmentArrays(self.index_dir, manifest.reranker.store_dtype if manifest.reranker else None)
        self._kinds, self._segments = (categories(self.rows.column(name)) for name in ("kind", "segment"))
        self._offsets = integers(self.rows.column("offset"))
        text_segments = set(self._segments[self._kinds == "text"])
        for seg in manifest.segments:
            self.arrays.open(seg, "emb")
            if manifest.reranker:
                self.arrays.open(seg, "tok")
                if seg in text_segments:
                    self.arrays.open(seg, "mask")

    @classmethod
    def open(cls, index_dir: Path) -> Snapshot:
        """The index's latest committed generation."""
        index_dir = Path(index_dir)
        for _ in range(OPEN_ATTEMPTS):
            manifest = read_manifest(index_dir)
            if manifest is None:
                raise IndexNotFoundError(
                    f"no index at {index_dir}; build one with `itm-index build FOLDER` "
                    "(or pass --index / set ITM_INDEX to use another)")
            try:
                return cls(index_dir, manifest)
            except FileNotFoundError as e:
                newer = read_manifest(index_dir)
                if newer is None or newer.generation == manifest.generation:
                    raise IndexDamagedError(describe(index_dir, [(Path(e.filename).name, "is missing")])) from None
        raise ItmError(f"index at {index_dir} changed {OPEN_ATTEMPTS} times while it was being opened; try again")

    def ann(self, kind: str) -> faiss.Index:
        """The FAISS index over the rows of `kind`, search parameters set (faiss does not save them).

        An on-disk IVF index is the one object this snapshot opened (its lists mapped, not copied).
        """
        if kind in self._on_disk:
            return self._on_disk[kind]
        import faiss

        from .ann import tune

        index = faiss.deserialize_index(np.asarray(self._ann_bytes[kind]))
        tune(index)
        return index

    def gather(self, row_ids: np.ndarray, part: str) -> np.ndarray:
        """Stack one array part ("emb", "tok", "mask") for the given row positions, in order."""
        return self.arrays.gather(self._segments[row_ids], self._offsets[row_ids], part)

    def kind_rows(self, kind: str) -> np.ndarray:
        """Row positions of one kind, in the order the FAISS index of that kind holds them."""
        return np.flatnonzero(self._kinds == kind)
