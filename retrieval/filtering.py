"""Filters and date order over one generation's rows, as arrays computed once per generation and reused by every query.

    >>> cols = RowColumns(snapshot.rows)
    >>> cols.mask(Filters(orientation="portrait", date_from="2024"))  # (rows,) bool
"""
from __future__ import annotations

import fnmatch
import os
import re
import time

import numpy as np
import pyarrow as pa

from itm.indexer.store import categories

from .query import Filters


class RowColumns:
    """The columns filters and sorting read, one entry per row of the generation (row positions)."""

    def __init__(self, rows: pa.Table):
        col = lambda name: rows.column(name).to_pylist()  # noqa: E731
        self.kinds = categories(rows.column("kind"))
        self.paths = [os.fsdecode(p) for p in col("path")]
        self.width = np.asarray([-1 if w is None else w for w in col("width")], np.int64)
        self.height = np.asarray([-1 if h is None else h for h in col("height")], np.int64)
        self.cameras = [" ".join(filter(None, (m, n))).lower() for m, n in zip(col("camera_make"), col("camera_model"))]
        self.dates = _date_keys(col("taken"), col("mtime_ns"))
        self.unmigrated = int(((self.kinds == "image") & (self.width < 0)).sum())  # images of a format-2 index

    def mask(self, f: Filters) -> np.ndarray:
        """(rows,) bool: the rows every condition of `f` holds for."""
        keep = np.ones(len(self.kinds), bool)
        if f.path is not None:
            rx = re.compile(fnmatch.translate(f.path))
            keep &= np.fromiter((rx.match(p) is not None for p in self.paths), bool, len(self.paths))
        if f.date_from is not None:
            keep &= self.dates >= f.date_from  # a shorter bound sorts before every date it is a prefix of
        if f.date_to is not None:
            keep &= self.dates.astype(f"U{len(f.date_to)}") <= f.date_to  # compared at the bound's precision
        if f.camera is not None:
            words = f.camera.lower().split()
            keep &= np.fromiter((all(w in c for w in words) for c in self.cameras), bool, len(self.cameras))
        if f.min_width is not None:
            keep &= self.width >= f.min_width
        if f.min_height is not None:
            keep &= self.height >= f.min_height
        if f.orientation is not None:
            known = self.width > 0
            keep &= known & {"landscape": self.width > self.height, "portrait": self.width < self.height,
                             "square": self.width == self.height}[f.orientation]
        return keep


def _date_keys(taken: list[str | None], mtime_ns: list[int]) -> np.ndarray:
    """Each row's date as 'YYYY-MM-DDTHH:MM:SS': the EXIF capture time, else the file's modification time in
    local time (as a camera's clock shows it)."""
    secs = np.asarray(mtime_ns, np.int64) // 1_000_000_000
    offsets = np.asarray([time.localtime(s).tm_gmtoff for s in secs.tolist()], np.int64)
    local = np.datetime_as_string((secs + offsets).astype("datetime64[s]"), unit="s") if len(secs) \
        else np.zeros(0, "U19")
    return np.where([t is not None for t in taken], [t or "" for t in taken], local).astype("U19")
