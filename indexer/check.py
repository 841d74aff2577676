"""Is every file the manifest names there, and as it was written? itm-index check, a search's look, a build's repair.

Each commit records every file's size and sha256 in the manifest (`Manifest.digests`). Three
depths of looking:

- `quick_damage`: each file exists and has its recorded size (a stat each): what a search and a
  build do before they open anything, so that a truncated or missing file is named, not a traceback;
- `full_damage`: the sizes and the content hashes, and for an index without digests what each
  file holds (a NumPy header, a Parquet footer, a FAISS file) against the manifest: itm-index check;
- a check that finds damage leaves `damaged.json` in the index, so that the next build, which stats
  every file but hashes only those, repairs what the check named even where the sizes still agree.

    >>> report = check_index(Path("idx"))
    >>> report.damaged
    [('seg-3f2a.emb.npy', 'is 4,096 bytes; the manifest says 65,664')]
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from itm.common.durable import write_durably
from itm.common.errors import IndexDamagedError, IndexFormatError, ItmError

from .manifest import MANIFEST, Manifest, load_manifest

MARKER = "damaged.json"  # what the last check found, for the next build to repair
Damage = list[tuple[str, str]]  # (file name in the index folder, what is wrong with it)


def digest(path: Path) -> list:
    """[size, sha256] of a file."""
    with open(path, "rb") as f:
        return [path.stat().st_size, hashlib.file_digest(f, "sha256").hexdigest()]


def needed(manifest: Manifest, index_dir: Path) -> list[str]:
    """The files this generation needs: those with a digest, else the ones its layout implies."""
    if manifest.digests:
        return sorted(manifest.digests)
    names = {n for n in manifest.files() if not n.startswith("seg-")}  # a segment's parts depend on its kind
    if manifest.reranker:
        names.discard(manifest.reranker.card_file)  # a reranker may come without a card
    for seg in manifest.segments:
        names |= {f"{seg}.parquet", f"{seg}.emb.npy"}
        if manifest.reranker:
            names |= {f"{seg}.tok8.npy", f"{seg}.tokscale.npy"} if manifest.reranker.store_dtype == "int8" \
                else {f"{seg}.tok.npy"}
    return sorted(names)


def digests_of(manifest: Manifest, index_dir: Path, known: dict[str, list]) -> dict[str, list]:
    """The digests of the files `manifest` names that exist (segment parts are optional), reusing `known`
    for segments and the reranker's copy, which never change once written."""
    out = {}
    for name in sorted(manifest.files()):
        if name.startswith(("seg-", "reranker-")) and name in known:
            out[name] = known[name]
        elif (index_dir / name).is_file():
            out[name] = digest(index_dir / name)
    return out


def quick_damage(manifest: Manifest, index_dir: Path) -> Damage:
    """Files missing, or of another size than recorded (a stat each)."""
    damage = []
    for name in needed(manifest, index_dir):
        try:
            size = (index_dir / name).stat().st_size
        except FileNotFoundError:
            damage.append((name, "is missing"))
            continue
        recorded = manifest.digests.get(name, [size])[0]
        if size != recorded:
            damage.append((name, f"is {size:,} bytes; the manifest says {recorded:,}"))
    return damage


def full_damage(manifest: Manifest, index_dir: Path, names: set[str] | None = None) -> Damage:
    """quick_damage, then the content of every file (or of `names`): its hash, or what it holds."""
    damage = quick_damage(manifest, index_dir)
    seen = {name for name, _ in damage}
    for name in needed(manifest, index_dir):
        if name in seen or (names is not None and name not in names):
            continue
        if name in manifest.digests:
            if digest(index_dir / name)[1] != manifest.digests[name][1]:
                damage.append((name, "holds other bytes than were written (sha256 differs)"))
        elif (why := _unreadable(index_dir / name)) is not None:
            damage.append((name, why))
    return damage


def _unreadable(path: Path) -> str | None:
    """Why a file without a digest cannot be what its name says, or None."""
    try:
        if path.name.endswith(".npy"):
            import numpy as np

            np.load(path, mmap_mode="r")
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.read_metadata(path)
        elif path.suffix == ".faiss":
            import faiss

            faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except Exception as e:  # noqa: BLE001 - whatever the reader says is the reason
        return f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None


def marked(index_dir: Path) -> set[str]:
    """The files the last check found damaged (none when it found none, or ran on no check)."""
    try:
        return set(json.loads((index_dir / MARKER).read_text()))
    except (OSError, ValueError, TypeError):
        return set()


def describe(index_dir: Path, damage: Damage) -> str:
    """One line: the first damaged file, how many more, and what to run."""
    name, why = damage[0]
    more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
    return (f"{index_dir / name} {why}{more}; run `itm-index check --index {index_dir}` to list what is damaged, "
            "then `itm-index build SOURCE` for each source to repair it")


@dataclass(frozen=True)
class CheckReport:
    index_dir: Path
    files: int  # files verified
    damaged: Damage
    hashed: bool  # whether the files were verified by their recorded sha256 (else by what they hold)


def check_index(index_dir: Path) -> CheckReport:
    """Verify every file of the index's current generation; leave `damaged.json` for the next build when damaged."""
    index_dir = Path(index_dir)
    try:
        manifest, own = load_manifest(index_dir)  # `own`: what is wrong with manifest.json, read from its copy
    except (IndexFormatError, ItmError) as e:
        raise IndexDamagedError(f"{index_dir / 'manifest.json'} cannot be read ({e}); it names every file of the "
                                "index, so the index must be built again into a new --index folder") from None
    if manifest is None:
        raise IndexDamagedError(f"no index at {index_dir} (no manifest.json)")
    damage = ([(MANIFEST, own)] if own else []) + full_damage(manifest, index_dir)
    marker = index_dir / MARKER
    if damage:
        data = json.dumps(sorted(name for name, _ in damage)).encode()
        write_durably(marker, lambda f: f.write(data))
    else:
        marker.unlink(missing_ok=True)
    return CheckReport(index_dir, len(needed(manifest, index_dir)), damage, bool(manifest.digests))
