"""What `itm-index info` shows about an index, as one JSON-ready dict; the server's /api/info answers the same."""
from __future__ import annotations

import os
import stat
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itm.models.artifacts import read_card

from . import store

if TYPE_CHECKING:
    from .store import Snapshot


def index_info(snap: Snapshot) -> dict[str, Any]:
    """Counts, model, reranker, FAISS indexes, size on disk, generation and skipped files of a snapshot.

    Paths that are not UTF-8 appear as os.fsdecode gives them (odd bytes as \\udcXX).
    """
    m = snap.manifest
    disk = sum(_size(p) for p in snap.index_dir.iterdir())
    skipped = [{**s, "source": os.fsdecode(s["source"]), "path": os.fsdecode(s["path"])}
               for s in snap.skipped.to_pylist()]
    return {"index": str(snap.index_dir), "counts": m.counts, "model": asdict(m.model),
            "reranker": m.reranker and asdict(m.reranker), "ann": {k: asdict(a) for k, a in m.ann.items()},
            "reranker_card": read_card(snap.index_dir / m.reranker.file) if m.reranker else None,
            "precision": _precisions(snap), "bytes_on_disk": disk, "generation": m.generation, "skipped": skipped}


def _precisions(snap: Snapshot) -> dict[str, int]:
    """Live items by the precision their embeddings were made with ("fp32+int8": compacted from both)."""
    out: dict[str, int] = {}
    for seg in snap.rows.column("segment").value_counts().to_pylist():  # live rows per segment, one pass
        p = store.segment_precision(snap.index_dir, seg["values"])
        out[p] = out.get(p, 0) + seg["counts"]
    return out


def _size(path: Path) -> int:
    """Bytes of a file; 0 for anything else, or for a file a concurrent commit deleted meanwhile."""
    try:
        st = path.stat()
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0
