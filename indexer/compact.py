"""Compaction: segments holding dead rows (deleted or replaced items), or too few rows, are rewritten.

A segment is immutable, so deleting or changing an item leaves its row in the segment, dead:
no live row points at it any more. Compaction copies the live rows of such segments (and of
small ones, which incremental builds leave behind) into new segments, points the live rows
at the copies, and commits that as a new generation like any other: the rows keep their ids
and order, so the ANN indexes stay valid and are kept as they are. A build compacts when the
dead share of stored rows passes BuildOptions.compact_at; `itm-index compact` does it at will.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from itm.common.errors import IndexDamagedError, IndexNotFoundError
from itm.common.options import SEGMENT_ROWS
from itm.common.paths import default_index_dir

from . import store
from .check import describe
from .commit import Writer, locked
from .manifest import Manifest
from .migrate import migrate_rows


@dataclass(frozen=True)
class CompactReport:
    index_dir: Path
    dead_rows: int  # stored rows that no live row pointed at, dropped
    segments_before: int
    segments_after: int
    seconds: float


def compact_index(index_dir: Path | str | None = None, segment_rows: int = SEGMENT_ROWS,
                  wait: bool = True) -> CompactReport:
    """Rewrite the index's segments that hold dead rows or fewer than half of `segment_rows` rows; while another
    build or compaction writes the index, wait for it (`wait=False`: refuse at once).

    >>> compact_index("idx/").dead_rows
    1200
    """
    t0 = time.perf_counter()
    index_dir = Path(index_dir) if index_dir else default_index_dir()
    if not (index_dir / "manifest.json").is_file():
        raise IndexNotFoundError(f"no index at {index_dir}; pass --index or set ITM_INDEX to an index directory")
    with locked(index_dir, wait):
        writer = Writer(index_dir)
        if writer.damage:  # a compaction copies rows out of the segments: it needs them whole
            raise IndexDamagedError(describe(index_dir, writer.damage))
        migrate_rows(writer)  # a format-2 index gets its images' metadata (indexer/migrate.py)
        before = len(writer.manifest.segments)
        dropped = compact(writer, segment_rows)
    return CompactReport(index_dir, dropped, before, len(writer.manifest.segments), time.perf_counter() - t0)


def dead_rows(manifest: Manifest, rows: pa.Table) -> int:
    """Rows stored in the manifest's segments that no live row points at."""
    return sum(manifest.segments.values()) - len(_live(rows))


def dead_share(manifest: Manifest, rows: pa.Table) -> float:
    stored = sum(manifest.segments.values())
    return dead_rows(manifest, rows) / stored if stored else 0.0


def compact(writer: Writer, segment_rows: int = SEGMENT_ROWS) -> int:
    """Compact under the writer's lock and commit; returns the dead rows dropped (0: nothing was worth doing)."""
    m, rows = writer.manifest, writer.rows
    live = _live(rows)
    live_per_segment: dict[str, int] = {}
    for seg, _ in live:
        live_per_segment[seg] = live_per_segment.get(seg, 0) + 1
    dead = {seg: n - live_per_segment.get(seg, 0) for seg, n in m.segments.items()}
    segments = rows.column("segment").to_pylist()
    kinds = rows.column("kind").to_pylist()
    kind_of = dict(zip(segments, kinds))
    moves: dict[tuple[str, int], tuple[str, int]] = {}
    dropped = 0
    for kind in sorted(set(kinds)):
        chosen = {s for s, k in kind_of.items() if k == kind and (dead[s] or m.segments[s] < segment_rows // 2)}
        if not any(dead[s] for s in chosen) and len(chosen) < 2:
            continue  # nothing dead, and no small segments to merge
        moves |= _rewrite(writer, rows, kind, chosen, segment_rows)
        dropped += sum(dead[s] for s in chosen)
    if not moves:
        return 0
    offsets = rows.column("offset").to_pylist()
    moved = [moves.get((s, o), (s, o)) for s, o in zip(segments, offsets)]
    rows = rows.set_column(rows.schema.get_field_index("segment"), "segment", pa.array([s for s, _ in moved]))
    rows = rows.set_column(rows.schema.get_field_index("offset"), "offset", pa.array([o for _, o in moved], pa.int64()))
    writer.commit(rows, writer.skipped, next_id=m.next_id, ann=m.ann)
    return dropped


def _live(rows: pa.Table) -> dict[tuple[str, int], int]:
    """Each (segment, offset) that live rows point at -> the position of the first such row."""
    out: dict[tuple[str, int], int] = {}
    for i, key in enumerate(zip(rows.column("segment").to_pylist(), rows.column("offset").to_pylist())):
        out.setdefault(key, i)
    return out


def _rewrite(writer: Writer, rows: pa.Table, kind: str, chosen: set[str],
             segment_rows: int) -> dict[tuple[str, int], tuple[str, int]]:
    """Copy the live rows of the `chosen` segments (all of one kind) into new segments, in row order."""
    keep = [(key, i) for key, i in _live(rows).items() if key[0] in chosen]
    parts = ["emb"] + (["tok"] if writer.manifest.reranker else []) + \
        (["mask"] if writer.manifest.reranker and kind == "text" else [])
    seg_rows = rows.select(store.SEGMENT_SCHEMA.names)
    precisions = {s: store.segment_precision(writer.index_dir, s) for s in chosen}
    moves = {}
    for start in range(0, len(keep), segment_rows):
        chunk = keep[start:start + segment_rows]
        segments = np.array([s for (s, _), _ in chunk], dtype=object)
        offsets = np.array([o for (_, o), _ in chunk])
        arrays = {part: writer.arrays.gather(segments, offsets, part) for part in parts}
        made_with = sorted({precisions[s] for s in set(segments)})  # rows copied, not encoded again
        name = writer.write_segment(seg_rows.take([i for _, i in chunk]).to_pylist(), arrays["emb"],
                                    arrays.get("tok"), arrays.get("mask"), "+".join(made_with))
        moves |= {key: (name, j) for j, (key, _) in enumerate(chunk)}
    return moves
