"""The manifest: what one generation of an index holds, which model made it, and the format's history.

`manifest.json` names every data file of the generation (see indexer/store.py for the layout)
and is replaced atomically by each commit. This module imports neither torch, faiss nor
open_clip, so that the query path can read an index's model identity before loading anything.

    >>> m = read_manifest(Path("idx"))
    >>> m.model.label, m.counts
    ('demo (itm-demo/checkpoint 3f2a9c0d1e4b)', {'image': 300, 'text': 300})
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from itm.common.durable import fsync_dir, write_durably
from itm.common.errors import IndexFormatError, ItmWarning, ModelMismatchError
from itm.models.identity import ModelIdentity
from itm.models.registry import ModelSpec, resolve_model

MANIFEST = "manifest.json"
MANIFEST_COPY = "manifest.copy.json"  # written after it at each commit: what names the files if it is damaged
OPTIONAL_ANN = ("ivfdata", "nprobe", "recall_target")  # AnnInfo fields left out of the JSON when unset
KINDS = ("image", "text")

# Format history. Each change says why; MIGRATIONS holds one step up from each older format,
# and a format newer than FORMAT_VERSION is refused.
#   1: first format.
#   2: paths (the source given to `build`, each item's file, each skipped file) are stored as bytes,
#      exactly as the file system gives them: a name that is not UTF-8 crashed format 1's text
#      columns. Segments and staging map each segment to its row count, so that compaction can
#      tell dead rows without opening every segment. Format 1's text columns are read as bytes
#      (store.read_table casts them); its segment lists get their counts from the .npy headers.
#   3: rows hold what users filter images on (dimensions, EXIF capture date, camera, GPS; store.SEGMENT_SCHEMA),
#      read at build time. The manifest itself is unchanged; format 2's rows read with those columns null
#      (store.read_table), and the first build or compaction to open such an index reads them from the
#      image files and commits them (indexer/migrate.py).
#   Within format 3, each segment's Parquet metadata names the precision its embeddings were made with
#   (store.PRECISION_KEY); a segment without it reads as store.UNRECORDED, and older code ignores it.
#   Within format 3, `digests` records each file's size and sha256 (indexer/check.py); without it an index is
#   checked by what its files hold, and older code ignores it.
FORMAT_VERSION = 3


@dataclass(frozen=True)
class RerankerInfo:
    """The fusion reranker whose store encoder made the index's rerank store; a copy lives in the index."""

    sha256: str  # of the reranker checkpoint file
    file: str  # the copy's name inside the index folder (its JSON config sits beside it)
    source: str  # where it was copied from
    image_shape: tuple[int, int, int]  # (levels, tokens, width) stored per image, fp16
    text_shape: tuple[int, int, int]  # (levels, tokens, width) stored per text, fp16
    # Optional, written only when set: "int8" keeps the features as int8 with a float16 scale per token
    # (seg-*.tok8.npy, seg-*.tokscale.npy: files an older itm does not find, so it refuses the index
    # rather than misread it); None: float16 (seg-*.tok.npy).
    store_dtype: str | None = None

    @property
    def config_file(self) -> str:
        return str(Path(self.file).with_suffix(".json"))

    @property
    def card_file(self) -> str:
        """Its model card (models/artifacts.py), when the checkpoint came with one."""
        return str(Path(self.file).with_suffix(".card.json"))


@dataclass(frozen=True)
class AnnInfo:
    """One FAISS index over the live rows of one kind, in row order."""

    file: str
    factory: str  # FAISS factory string, e.g. "Flat", "HNSW32"
    metric: str  # "inner_product" (of unit vectors: cosine)
    dim: int
    ntotal: int
    recall_at_10: float  # against exact search, measured at commit (itm.indexer.ann.measured_recall)
    # Optional fields, written only when set, so that an index without them reads as format 2 always did.
    ivfdata: str | None = None  # an IVF index's inverted lists, memory-mapped from this file (indexer/ivf_disk.py)
    nprobe: int | None = None  # lists an on-disk IVF index probes per query, chosen to reach recall_target
    recall_target: float | None = None  # the recall@10 the nprobe was chosen for


@dataclass(frozen=True)
class Manifest:
    """One committed generation of an index (or generation 0, which only holds staged segments)."""

    model: ModelIdentity
    reranker: RerankerInfo | None = None
    generation: int = 0
    rows: str = "rows-g0.parquet"  # the live rows, each pointing at (segment, offset)
    skipped: str = "skipped-g0.parquet"  # corpus items that could not be used, with the reason
    ann: dict[str, AnnInfo] = field(default_factory=dict)  # by kind; a kind without rows has none
    segments: dict[str, int] = field(default_factory=dict)  # segments the live rows point into -> rows each holds
    staging: dict[str, int] = field(default_factory=dict)  # segments of a build that has not committed: unread
    next_id: int = 0  # the id the next new row gets
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))  # live rows by kind
    faiss_factory: str | None = None  # forced by the user; None: chosen from the corpus size at each commit
    updated_at: str | None = None  # time of the commit
    format: int = FORMAT_VERSION
    # source path -> {"sha256": fingerprint of its listing at its last commit, "items": its live rows}
    # (indexer/listing.py); absent for a source whose build skipped anything. Optional: an index
    # without it reads as before, and an older itm ignores it.
    listings: dict[str, dict] = field(default_factory=dict)
    # file -> [size in bytes, sha256] of every file this generation needs, taken when it was written
    # (indexer/check.py: itm-index check verifies them, searches and builds compare the sizes). Optional:
    # an index without it is checked by what its files hold, and an older itm ignores it.
    digests: dict[str, list] = field(default_factory=dict)

    def files(self) -> set[str]:
        """Every data file this generation needs (segment parts that were never written included)."""
        names = {self.rows, self.skipped, *(a.file for a in self.ann.values()),
                 *(a.ivfdata for a in self.ann.values() if a.ivfdata)}
        for seg in (*self.segments, *self.staging):
            names |= {f"{seg}.parquet", f"{seg}.emb.npy", f"{seg}.tok.npy", f"{seg}.mask.npy", f"{seg}.tok8.npy",
                      f"{seg}.tokscale.npy"}
        if self.reranker:
            names |= {self.reranker.file, self.reranker.config_file, self.reranker.card_file}
        return names

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ann"] = {kind: {k: v for k, v in a.items() if v is not None or k not in OPTIONAL_ANN}
                    for kind, a in d["ann"].items()}
        if d["reranker"] and d["reranker"]["store_dtype"] is None:
            del d["reranker"]["store_dtype"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        """A manifest of the current format from its JSON form; KeyError/TypeError when it is malformed."""
        rr = d.get("reranker")
        return cls(
            model=ModelIdentity(**_known(ModelIdentity, d["model"])),
            reranker=RerankerInfo(**{**_known(RerankerInfo, rr), "image_shape": tuple(rr["image_shape"]),
                                     "text_shape": tuple(rr["text_shape"])}) if rr else None,
            generation=int(d["generation"]), rows=d["rows"], skipped=d["skipped"],
            ann={kind: AnnInfo(**_known(AnnInfo, a)) for kind, a in d["ann"].items()},
            segments=dict(d["segments"]), staging=dict(d.get("staging", {})), next_id=int(d["next_id"]),
            counts={**dict.fromkeys(KINDS, 0), **d["counts"]}, faiss_factory=d.get("faiss_factory"),
            updated_at=d.get("updated_at"), format=int(d["format"]), listings=dict(d.get("listings", {})),
            digests=dict(d.get("digests", {})))


def _known(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _from_format_1(raw: dict[str, Any], index_dir: Path) -> dict[str, Any]:
    return {**raw, "segments": {s: _segment_rows(index_dir, s) for s in raw["segments"]},
            "staging": {s: _segment_rows(index_dir, s) for s in raw.get("staging", [])}}


def _segment_rows(index_dir: Path, segment: str) -> int:
    """Rows of a segment, from the header of its embeddings file."""
    import numpy as np

    with open(index_dir / f"{segment}.emb.npy", "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(f)
    return int(shape[0])


def _from_format_2(raw: dict[str, Any], index_dir: Path) -> dict[str, Any]:
    return raw  # the manifest is the same; the rows' new columns are read as nulls and filled by indexer/migrate.py


Migration = Callable[[dict[str, Any], Path], dict[str, Any]]
MIGRATIONS: dict[int, Migration] = {1: _from_format_1, 2: _from_format_2}  # format N -> the step from N to N + 1


def read_manifest(index_dir: Path) -> Manifest | None:
    """The index's current manifest, migrated to FORMAT_VERSION; None when there is no index there.

    A manifest.json that cannot be read (damaged on disk, or gone) is read from its copy, written beside it at
    every commit, with a warning: the next build writes it anew."""
    manifest, damage = load_manifest(index_dir)
    if damage is not None:
        warnings.warn(f"{Path(index_dir) / MANIFEST} {damage}; read its copy {MANIFEST_COPY} (generation "
                      f"{manifest.generation}): `itm-index build SOURCE` writes it anew", ItmWarning, stacklevel=2)
    return manifest


def load_manifest(index_dir: Path) -> tuple[Manifest | None, str | None]:
    """read_manifest without the warning: the manifest, and what is wrong with manifest.json when it was read
    from its copy (None when manifest.json itself was read, or there is no index)."""
    path, copy = Path(index_dir) / MANIFEST, Path(index_dir) / MANIFEST_COPY
    try:
        return _load(path, index_dir), None
    except FileNotFoundError:
        if not copy.exists():
            return None, None
        damage = "is missing"
    except _Damaged as e:
        if not copy.exists():  # an index from before copies were kept, or no itm index at all
            raise IndexFormatError(f"{path} {e}; {e.remedy}") from None
        damage = str(e)
    try:
        return _load(copy, index_dir), damage
    except (FileNotFoundError, _Damaged):
        raise IndexFormatError(f"{path} {damage}, and so is its copy {copy.name}; it names every file of the index, "
                               "so the index must be built again into a new --index folder") from None


class _Damaged(IndexFormatError):
    """A manifest file that cannot be read as one; `remedy` is what to do when it has no copy."""

    def __init__(self, what: str, remedy: str = "rebuild the index into a new --index directory"):
        super().__init__(what)
        self.remedy = remedy


def _load(path: Path, index_dir: Path) -> Manifest:
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Damaged(f"is corrupt ({e})") from None
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if not isinstance(fmt, int) or fmt < 1:
        raise _Damaged("is not an itm manifest", "pass --index for an itm index directory")
    if fmt > FORMAT_VERSION:
        raise IndexFormatError(
            f"index at {index_dir} has format {fmt}, newer than this itm understands ({FORMAT_VERSION}); "
            "upgrade itm or pass --index for another index")
    if raw["format"] < FORMAT_VERSION:
        raw.pop("digests", None)  # no older format kept them; a migration may read files another way
    while raw["format"] < FORMAT_VERSION:
        raw = {**MIGRATIONS[raw["format"]](raw, Path(index_dir)), "format": raw["format"] + 1}
    try:
        return Manifest.from_json(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise _Damaged(f"is corrupt (bad or missing {e})") from None


def write_manifest(index_dir: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically: readers see the old generation or the new one, never a mix. A copy is
    written after it: should manifest.json be damaged, the copy (of this generation or, after a crash between
    the two, of the one before, whose files a commit keeps) still names the index's files."""
    data = json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode()
    write_durably(Path(index_dir) / MANIFEST, lambda f: f.write(data))
    write_durably(Path(index_dir) / MANIFEST_COPY, lambda f: f.write(data))
    fsync_dir(Path(index_dir))


def check_model(manifest: Manifest, model: ModelIdentity, index_dir: Path) -> None:
    """Refuse to add to, or query, an index with another model than the one it was built with."""
    if not manifest.model.same_weights(model):
        raise ModelMismatchError(
            f"index at {index_dir} was built with {manifest.model.label}, not {model.label}; "
            "pass --index for another index, or delete this one and build it again with that model")


def check_reranker(manifest: Manifest, sha256: str | None, index_dir: Path) -> None:
    """Refuse to mix rerank-store features of two rerankers (or none and one) in one index."""
    old = manifest.reranker.sha256 if manifest.reranker else None
    if old != sha256:
        raise ModelMismatchError(
            f"index at {index_dir} holds a rerank store for reranker {str(old)[:12]}, not {str(sha256)[:12]}; "
            "pass --index for another index, or delete this one and build it again with that reranker")


def next_generation(manifest: Manifest, **changes: Any) -> Manifest:
    """The manifest of the following generation, with `changes` applied."""
    return replace(manifest, generation=manifest.generation + 1, **changes)


def spec_for_index(manifest: Manifest, index_dir: Path) -> ModelSpec:
    """The model an index was built with, which its later builds and its queries load by default."""
    m = manifest.model
    if m.name:
        return resolve_model(m.name)
    reranker = Path(index_dir) / manifest.reranker.file if manifest.reranker else None
    return ModelSpec(m.arch, m.pretrained, Path(m.checkpoint) if m.checkpoint else None, reranker)
