"""What a query may hold beyond one text or image: weighted parts, filters, a probability cut, sorting, de-duplication.

Plain data, importing nothing heavy: itm-search builds these for the in-process search and for a
running server alike (retrieval/client.py sends them as JSON).

    >>> Part.parse("2:cat")
    Part(weight=2.0, text='cat', image=None)
    >>> Filters.parse(date="2024-03..2024-06", orientation="landscape").date_to
    '2024-06'
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from indexer.errors import QueryError

SORTS = ("score", "date", "path")  # --sort: date is newest first (capture date, else modification time)
ORIENTATIONS = ("landscape", "portrait", "square")
# --dedup: results whose embeddings have at least this cosine are near-duplicates (benchmarks/dedup_threshold.py)
DEFAULT_DEDUP = 0.98
_WEIGHT = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)):(.+)$", re.S)
_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")
_SIZE = re.compile(r"^(\d+)(?:x(\d+))?$")


@dataclass(frozen=True)
class Part:
    """One weighted part of a query: a text or an image file, weight positive (more like) or negative (less like)."""

    weight: float
    text: str | None = None
    image: str | None = None  # an image file's path

    @classmethod
    def parse(cls, value: str, sign: float = 1.0, image: bool = False) -> Part:
        """`cat`, `2:cat`, `0.5:./snow.jpg`: an optional `WEIGHT:` prefix (to search for a text that starts with
        a number and a colon, write its weight first: `1:3:10 train`)."""
        m = _WEIGHT.match(value)
        weight, rest = (float(m.group(1)), m.group(2)) if m else (1.0, value)
        if weight == 0:
            raise QueryError(f"{value!r} has weight 0; give a weight other than 0, or leave the part out")
        return cls(sign * weight, None if image else rest, rest if image else None)


@dataclass(frozen=True)
class Filters:
    """Which items a query may return; each given condition must hold. Texts have no image metadata: a filter on
    dimensions, camera or orientation keeps only images."""

    path: str | None = None  # glob on the whole path, as fnmatch reads it: `*/2024/*`, `*.jpg`
    date_from: str | None = None  # YYYY, YYYY-MM or YYYY-MM-DD, inclusive: capture date, else modification time
    date_to: str | None = None  # the same, inclusive (2024-06 includes all of June)
    camera: str | None = None  # words found in "make model", ignoring case: `canon`, `iphone 12`
    min_width: int | None = None  # pixels, as shown
    min_height: int | None = None
    orientation: str | None = None  # landscape (wider than tall), portrait, square

    @classmethod
    def parse(cls, path: str | None = None, date: str | None = None, camera: str | None = None,
              min_size: str | None = None, orientation: str | None = None) -> Filters:
        """From the command line's forms: `--date 2024-03-01..2024-06-30` (either side may be left out;
        one date alone means that day, month or year), `--min-size 1920x1080` or `--min-size 1000` (both sides)."""
        date_from = date_to = None
        if date:
            lo, sep, hi = date.partition("..")
            date_from, date_to = (lo or None, hi or None) if sep else (date, date)
        min_width = min_height = None
        if min_size:
            m = _SIZE.match(min_size.strip().lower())
            if not m:
                raise QueryError(f"--min-size {min_size!r}: give WIDTHxHEIGHT (1920x1080) or one number for both")
            min_width, min_height = int(m.group(1)), int(m.group(2) or m.group(1))
        return cls(path, date_from, date_to, camera, min_width, min_height, orientation).checked()

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Filters:
        names = {f.name for f in fields(cls)}
        unknown = set(d or {}) - names
        if unknown:
            raise QueryError(f"unknown filter {sorted(unknown)[0]!r}; filters are {', '.join(sorted(names))}")
        return cls(**(d or {})).checked()

    def checked(self) -> Filters:
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value is not None and not _DATE.match(value):
                raise QueryError(f"date {value!r} is not YYYY, YYYY-MM or YYYY-MM-DD")
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise QueryError(f"unknown orientation {self.orientation!r}; choose one of {', '.join(ORIENTATIONS)}")
        if self.camera is not None and not self.camera.strip():
            return replace(self, camera=None)
        return self

    @property
    def active(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    @property
    def needs_metadata(self) -> bool:
        """Whether it reads columns that only images indexed by format 3 have."""
        return any(v is not None for v in (self.camera, self.min_width, self.min_height, self.orientation))

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Refine:
    """What happens to the candidates once they are scored."""

    min_prob: float | None = None  # keep only hits whose calibrated probability of match is at least this
    sort: str = "score"  # one of SORTS, applied after the cut
    dedup: float | None = None  # cosine at or above which two results are near-duplicates; None: keep all

    def checked(self) -> Refine:
        if self.min_prob is not None and not 0.0 <= self.min_prob <= 1.0:
            raise QueryError(f"--min-prob must be between 0 and 1, got {self.min_prob}")
        if self.sort not in SORTS:
            raise QueryError(f"unknown sort {self.sort!r}; choose one of {', '.join(SORTS)}")
        if self.dedup is not None and not -1.0 <= self.dedup <= 1.0:
            raise QueryError(f"--dedup is a cosine similarity between -1 and 1, got {self.dedup}")
        return self
