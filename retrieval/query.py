"""The query: one text or image, weighted parts, filters, a probability cut, sorting, de-duplication.

Defined once, here, with its defaults, its checks and its JSON form: itm-search builds a Query from
its options, the client sends `Query.to_json()` to a running server, every server route makes one,
the service hands it on, and the Searcher answers it. Plain data, importing nothing heavy.

    >>> Part.parse("2:cat")
    Part(weight=2.0, text='cat', image=None, image_id=None, image_name=None)
    >>> Filters.parse(date="2024-03..2024-06", orientation="landscape").date_to
    '2024-06'
    >>> Query.from_json(Query("a dog", k=3, refine=Refine(min_prob=0.5)).to_json()) == Query("a dog", k=3, refine=Refine(min_prob=0.5))
    True
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from itm.common.errors import QueryError
from itm.common.options import DEFAULT_K, DEFAULT_RERANK_K

SORTS = ("score", "date", "path")  # --sort: date is newest first (capture date, else modification time)
ORIENTATIONS = ("landscape", "portrait", "square")
# --dedup: results whose embeddings have at least this cosine are near-duplicates (benchmarks/dedup_threshold.py)
DEFAULT_DEDUP = 0.98
_WEIGHT = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)):(.+)$", re.S)
_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")
_SIZE = re.compile(r"^(\d+)(?:x(\d+))?$")


KINDS = ("image", "text", "all")  # what a query returns; default: image for a text query, all for an image


@dataclass(frozen=True)
class Part:
    """One weighted part of a query, weight positive (more like) or negative (less like): exactly one of a text,
    an image file (its path, or its bytes when uploaded) and an indexed image's row id."""

    weight: float
    text: str | None = None
    image: str | bytes | None = None  # an image file's path, or its bytes (an upload to a server)
    image_id: int | None = None  # an indexed image, by row id
    image_name: str | None = None  # how messages name an uploaded image (the path it was read from)

    @classmethod
    def parse(cls, value: str, sign: float = 1.0, image: bool = False) -> Part:
        """`cat`, `2:cat`, `0.5:./snow.jpg`: an optional `WEIGHT:` prefix (to search for a text that starts with
        a number and a colon, write its weight first: `1:3:10 train`)."""
        m = _WEIGHT.match(value)
        weight, rest = (float(m.group(1)), m.group(2)) if m else (1.0, value)
        if weight == 0:
            raise QueryError(f"{value!r} has weight 0; give a weight other than 0, or leave the part out")
        return cls(sign * weight, None if image else rest, rest if image else None)

    def format(self) -> str:
        """The command line's form of a text or image-file part, as `parse` (with the part's sign) reads it back:
        `Part.parse(p.format(), sign, image) == p` where sign is the weight's."""
        value = self.text if self.text is not None else self.image
        if not isinstance(value, str):
            raise QueryError("only a part holding a text or an image file's path has a command-line form")
        return f"{abs(self.weight)!r}:{value}"


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

    def format(self) -> dict[str, str | None]:
        """The command line's forms of the filters, as `parse` takes them: `Filters.parse(**f.format()) == f`."""
        date = None if self.date_from is None and self.date_to is None else \
            self.date_from if self.date_from == self.date_to else f"{self.date_from or ''}..{self.date_to or ''}"
        size = None if self.min_width is None and self.min_height is None else \
            f"{self.min_width or 0}x{self.min_height or 0}"
        return {"path": self.path, "date": date, "camera": self.camera, "min_size": size,
                "orientation": self.orientation}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Filters:
        if d is not None and not isinstance(d, dict):
            raise QueryError("filters must be a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = set(d or {}) - names
        if unknown:
            raise QueryError(f"unknown filter {sorted(unknown)[0]!r}; filters are {', '.join(sorted(names))}")
        return cls(**{name: _typed(d, name, int if name in ("min_width", "min_height") else str)
                      for name in (d or {})}).checked()

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


@dataclass(frozen=True)
class Query:
    """One search: at most one of text, image, image_id and image_path, and any further weighted parts."""

    text: str | None = None  # words to search images (or texts) for
    image: str | bytes | None = None  # a query image: its file's path, or its bytes (an upload to a server)
    image_name: str | None = None  # how messages name an uploaded `image` (itm-search sends the path it was given)
    image_id: int | None = None  # an indexed image, by row id ("more like this")
    image_path: str | None = None  # an indexed image, by its path as os.fsdecode gives it
    k: int = DEFAULT_K  # results per kind
    kind: str | None = None  # one of KINDS; None: image for a text query, all for an image (text with min_prob)
    rerank_k: int = DEFAULT_RERANK_K  # candidates the fusion model rescores
    rerank: bool = True  # False: rank by dual-encoder similarity alone
    parts: tuple[Part, ...] = ()  # more weighted texts and images
    filters: Filters = Filters()  # applied before ranking: k matching hits come back when k exist
    refine: Refine = Refine()  # applied to the scored candidates

    def checked(self, max_k: int | None = None) -> Query:
        """The query, or QueryError saying what is wrong with it; `max_k`: a server's cap on k and rerank_k."""
        given = sum(x is not None for x in (self.text, self.image, self.image_id, self.image_path))
        if given > 1 or (given == 0 and not self.parts):
            raise QueryError("give one query: a text, an image, or an indexed image's id or path")
        for p in self.parts:
            if sum(x is not None for x in (p.text, p.image, p.image_id)) != 1:
                raise QueryError("each part of a query holds one of a text, an image, or an indexed image's id")
        for name, value in (("k", self.k), ("rerank_k", self.rerank_k)):
            if value < 1 or (max_k is not None and value > max_k):
                raise QueryError(f"{name} must be between 1 and {max_k}, got {value}" if max_k is not None
                                 else f"{name} must be at least 1, got {value}")
        if self.kind is not None and self.kind not in KINDS:
            raise QueryError(f"unknown kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        self.refine.checked()
        return replace(self, parts=tuple(self.parts), filters=self.filters.checked())

    def to_json(self) -> dict[str, Any]:
        """The JSON form a server takes (POST /api/search): an image's bytes as base64, the refine fields flat."""
        out: dict[str, Any] = {"text": self.text, **_image_json(self.image, self.image_name),
                               "image_id": self.image_id, "image_path": self.image_path, "k": self.k,
                               "kind": self.kind, "rerank_k": self.rerank_k, "rerank": self.rerank,
                               "parts": [{"weight": p.weight, "text": p.text, **_image_json(p.image, p.image_name),
                                          "image_id": p.image_id} for p in self.parts],
                               "filters": self.filters.to_json(), **asdict(self.refine)}
        return {k: v for k, v in out.items() if v is not None or k in ("text", "min_prob", "dedup")}

    @classmethod
    def from_json(cls, d: Any) -> Query:
        """The query a JSON body asks; QueryError for anything it cannot be."""
        if not isinstance(d, dict):
            raise QueryError("a query is a JSON object")
        unknown = set(d) - JSON_FIELDS
        if unknown:
            raise QueryError(f"unknown field {sorted(unknown)[0]!r}; a query takes {', '.join(sorted(JSON_FIELDS))}")
        parts = d.get("parts") or []
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise QueryError("parts must be a list of JSON objects")
        refine = Refine(_typed(d, "min_prob", float), _typed(d, "sort", str) or "score", _typed(d, "dedup", float))
        return cls(_typed(d, "text", str), _image_bytes(d), _typed(d, "image_name", str), _typed(d, "image_id", int),
                   _typed(d, "image_path", str), _typed(d, "k", int, DEFAULT_K), _typed(d, "kind", str),
                   _typed(d, "rerank_k", int, DEFAULT_RERANK_K), _typed(d, "rerank", bool, True),
                   tuple(_part(p) for p in parts), Filters.from_json(d.get("filters")), refine).checked()


JSON_FIELDS = {"text", "image_base64", "image_name", "image_id", "image_path", "k", "kind", "rerank_k", "rerank",
               "parts", "filters", "min_prob", "sort", "dedup"}
PART_FIELDS = {"weight", "text", "image_base64", "image_name", "image_id"}


def _typed(d: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """d[name] if it is of `kind` (an int where a float is asked; never a bool for a number), else QueryError."""
    value = d.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, bool) if kind is bool else \
        isinstance(value, kind if kind is not float else (int, float)) and not isinstance(value, bool)
    if not ok or (kind is float and not math.isfinite(value)):
        raise QueryError(f"{name} must be {_KIND_NAMES[kind]}, got {json.dumps(value)[:40]}")
    return float(value) if kind is float else value


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _part(p: dict[str, Any]) -> Part:
    unknown = set(p) - PART_FIELDS
    if unknown:
        raise QueryError(f"unknown field {sorted(unknown)[0]!r} in a part; a part takes "
                         f"{', '.join(sorted(PART_FIELDS))}")
    return Part(_typed(p, "weight", float, 1.0), _typed(p, "text", str), _image_bytes(p), _typed(p, "image_id", int),
                _typed(p, "image_name", str))


def _image_json(image: str | bytes | None, name: str | None) -> dict[str, Any]:
    if image is None:
        return {}
    if isinstance(image, str):
        raise QueryError(f"{image}: a query sent as JSON carries the image's bytes, not its path (the client reads it)")
    return {"image_base64": binascii.b2a_base64(image, newline=False).decode("ascii"), "image_name": name}


def _image_bytes(d: dict[str, Any]) -> bytes | None:
    data = d.get("image_base64")
    if data is None:
        return None
    if not isinstance(data, str):
        raise QueryError("image_base64 must be a string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise QueryError("image_base64 is not valid base64") from None
