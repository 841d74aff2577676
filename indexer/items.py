"""One corpus item as a build reads it: an image file read once, hashed and prepared for the encoder,
and the row the index keeps for it. The local build and the Ray engine both read items this way."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from itm.common.errors import DecodeError
from itm.models.images import read_file

from .changes import content_hash
from .metadata import empty as no_metadata
from .metadata import read_metadata
from .scan import FileEntry


@dataclass(frozen=True)
class Decoded:
    """An image file read and hashed, and decoded unless its embedding is already stored."""

    entry: FileEntry
    hash: str | None = None
    pixels: np.ndarray | None = None  # (3, S, S) float32; None when reused or skipped
    error: str | None = None
    meta: dict = field(default_factory=no_metadata)  # indexer/metadata.py's columns


def decode_image(entry: FileEntry, prepare: Callable[[bytes], np.ndarray],
                 stored: Callable[[str], bool] = lambda h: False) -> Decoded:
    """An image file read once and hashed, and prepared for the encoder (ItemEncoder.load_pixels) unless
    `stored(hash)`; errors come back in the result, never raised."""
    try:
        data = read_file(Path(entry.path))
    except DecodeError as e:
        return Decoded(entry, error=str(e))
    h = content_hash(data)
    meta = read_metadata(data)
    if stored(h):
        return Decoded(entry, h, meta=meta)
    try:
        return Decoded(entry, h, prepare(data), meta=meta)
    except DecodeError as e:
        return Decoded(entry, h, error=str(e))


def image_row(entry: FileEntry, h: str, source: bytes | None = None, meta: dict | None = None) -> dict:
    """The row of an image file (store.SEGMENT_SCHEMA); segments leave the source out, the index's rows fill it.
    `meta`: indexer/metadata.py's columns, read from the file (null when not given)."""
    return {"kind": "image", "source": source, "path": os.fsencode(entry.path), "text": None, "source_id": None,
            "size": entry.size, "mtime_ns": entry.mtime_ns, "hash": h, **(meta if meta is not None else no_metadata())}
