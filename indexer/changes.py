"""Change detection: which items of a source are new, changed, unchanged or gone, and which need encoding.

An image whose size and mtime have not changed keeps its row unread; a text keeps its row when
its content has not changed. An added or changed item whose content (by hash) is already
stored, or is being encoded for another item of this build, reuses that embedding.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

Row = dict[str, Any]  # a row of store.ROW_SCHEMA (without id, segment and offset until resolved)


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class ContentIndex:
    """Where the embedding of each content hash is stored, as (segment, offset), and which are on their way."""

    def __init__(self) -> None:
        self._where: dict[str, tuple[str, int]] = {}
        self._coming: set[str] = set()

    @classmethod
    def of(cls, rows: Iterable[Row], staged: dict[str, list[str]]) -> ContentIndex:
        """From an index's live rows, and the hashes of its staged segments (by segment name)."""
        index = cls()
        for segment, hashes in staged.items():
            index.add(segment, hashes)
        for r in rows:
            index._where.setdefault(r["hash"], (r["segment"], r["offset"]))
        return index

    def __contains__(self, h: str) -> bool:
        """Stored already (safe to ask from decoding threads)."""
        return h in self._where

    def add(self, segment: str, hashes: Iterable[str]) -> None:
        """The contents of a segment just written, in its row order."""
        for offset, h in enumerate(hashes):
            self._where.setdefault(h, (segment, offset))
            self._coming.discard(h)

    def claim(self, h: str) -> bool:
        """True when content `h` must be encoded: neither stored nor on its way (and now it is on its way)."""
        if h in self._where or h in self._coming:
            return False
        self._coming.add(h)
        return True

    def locate(self, h: str) -> tuple[str, int]:
        return self._where[h]


@dataclass
class SourceChanges:
    """What a build of one source does to the rows the index holds for that source."""

    old: dict[str, Row]  # the index's rows of this source, by key (an image's path, a text's source id)
    key: str  # "path" or "source_id"
    kept: list[Row] = field(default_factory=list)  # carried over
    new: list[Row] = field(default_factory=list)  # added or updated, resolved to a segment by `rows`
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    restamped: int = 0  # unchanged rows whose file's size or mtime changed (a text file saved again as it was)
    reused: int = 0  # added or updated rows whose embedding was found by content hash

    @classmethod
    def of(cls, rows: Iterable[Row], source: Any, key: str) -> SourceChanges:
        return cls({r[key]: r for r in rows if r["source"] == source}, key)

    def same_file(self, key: str, size: int, mtime_ns: int) -> bool:
        row = self.old.get(key)
        return row is not None and row["size"] == size and row["mtime_ns"] == mtime_ns

    def keep(self, key: str, **updates: Any) -> None:
        row = {**self.old[key], **updates}
        self.kept.append(row)
        self.unchanged += 1
        self.restamped += row != self.old[key]

    def add(self, row: Row, content: ContentIndex) -> bool:
        """Count an added or updated row; True when its content must be encoded."""
        if row[self.key] in self.old:
            self.updated += 1
        else:
            self.added += 1
        self.new.append(row)
        if content.claim(row["hash"]):
            return True
        self.reused += 1
        return False

    @property
    def removed(self) -> int:
        """Rows of the source that are gone (deleted files and lines, and files that can no longer be used)."""
        seen = {r[self.key] for r in self.kept} | {r[self.key] for r in self.new}
        return len(self.old.keys() - seen)

    def rows(self, content: ContentIndex, next_id: int) -> tuple[list[Row], int]:
        """The source's rows after the build, new ones with fresh ids from `next_id`; and the next free id."""
        out = list(self.kept)
        for r in self.new:
            segment, offset = content.locate(r["hash"])
            out.append({**r, "id": next_id, "segment": segment, "offset": offset})
            next_id += 1
        return out, next_id
