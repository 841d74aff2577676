"""A search engine held open for many queries: what itm-serve answers with, apart from HTTP.

One Searcher, its models called by one query at a time (a torch module is not safe for
concurrent forward passes in every case, and the Searcher keeps the last query's timings); a
query that asks for recall only is answered by it without the reranker, exactly as
`itm-search --no-rerank` answers it in-process.
Before each query the service looks at the index's manifest (one stat) and, when a build has
committed since, moves the Searcher to the newest generation; a query holds one generation from
start to end, whose files its snapshot mapped when it opened. A newer generation that cannot be
taken (built with another model, say) leaves the service on the last good one, with the reason
in `refresh_error`.

    >>> service = SearchService("idx/")
    >>> service.search(Query(text="a red circle", k=3)).hits[0].path
    '/photos/0007.png'
"""
from __future__ import annotations

import io
import os
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from indexer.errors import EmptyIndexError, ItmError, QueryError, TooLargeError
from indexer.images import DEFAULT_MAX_PIXELS
from indexer.info import index_info
from indexer.manifest import MANIFEST
from indexer.options import BACKEND, DEVICE, PRECISION, default_index_dir
from indexer.store import Snapshot

from .gallery import IndexedImage, Thumbnails, find_image, find_image_by_path, read_image
from .hits import Hit
from .query import Filters, Part, Refine
from .search import Searcher
from .settings import DEFAULT_K, DEFAULT_RERANK_K, SERVER_MAX_K

UPLOAD_NAME = "the uploaded image"


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 32 * 2**20  # largest query image accepted, in bytes
    max_pixels: int = DEFAULT_MAX_PIXELS  # largest query image accepted, width x height (the decoder's cap at most)
    max_k: int = SERVER_MAX_K  # most results, and rerank candidates, per kind


@dataclass(frozen=True)
class QueryPart:
    """One more weighted part of a query: exactly one of text, image (a file's bytes), image_id."""

    weight: float = 1.0  # negative: results less like this
    text: str | None = None
    image: bytes | None = None
    image_name: str = UPLOAD_NAME
    image_id: int | None = None  # an indexed image, by row id


@dataclass(frozen=True)
class Query:
    """One search: exactly one of text, image (an image file's bytes), image_id or image_path."""

    text: str | None = None
    image: bytes | None = None  # a query image's file bytes, e.g. an upload
    image_name: str = UPLOAD_NAME  # how messages name `image` (itm-search sends the path it was given)
    image_id: int | None = None  # an indexed image, by row id ("more like this")
    image_path: str | None = None  # an indexed image, by its path as os.fsdecode gives it
    k: int = DEFAULT_K  # results per kind
    kind: str | None = None  # image, text or all (default: image for a text query, all for an image)
    rerank_k: int = DEFAULT_RERANK_K  # candidates the fusion model rescores
    rerank: bool = True  # False: rank by recall alone
    parts: tuple[QueryPart, ...] = ()  # more weighted texts and images (retrieval/query.py)
    filters: Filters = Filters()
    refine: Refine = Refine()


@dataclass(frozen=True)
class Answer:
    hits: list[Hit]
    generation: int  # the index generation the whole query read
    reranked: bool  # whether the fusion model was used (it rescores cross-modal candidates)
    timings: dict[str, float]  # encode_ms, recall_ms, rerank_ms, total_ms
    calibrated: bool = False  # whether the hits' probabilities come from a calibration fitted for the reranker
    unmigrated: int = 0  # images read without metadata (a format-2 index no build has migrated yet)


class SearchService:
    """A Searcher shared by many threads; see the module docstring."""

    def __init__(self, index_dir: Path | str | None = None, *, device: str = DEVICE, precision: str = PRECISION,
                 backend: str = BACKEND, threads: int | None = None, limits: Limits = Limits()):
        self.index_dir = Path(index_dir) if index_dir else default_index_dir()
        self.device, self.precision, self.limits = device, precision, limits
        self._runtime = dict(device=device, precision=precision, backend=backend, threads=threads)
        self.thumbnails = Thumbnails()
        self.refresh_error: str | None = None  # why the newest generation could not be taken, if it could not
        self.queries = 0  # received since start, answered or refused
        self._counting = threading.Lock()
        self._lock = threading.Lock()  # one query at a time through the Searcher and its models
        self._searcher: Searcher | None = None  # None while the index is empty
        self._empty: EmptyIndexError | None = None
        self._stamp: tuple[int, int, int] | None = None
        with self._lock:
            self._update(first=True)

    @property
    def has_reranker(self) -> bool:
        return self._searcher is not None and self._searcher.has_reranker

    def search(self, query: Query) -> Answer:
        start = time.perf_counter()
        with self._counting:
            self.queries += 1
        self._check(query)
        with self._query_image(query.image) as upload, self._part_images(query.parts) as uploads, self._lock:
            s = self._current()
            image = upload or self._indexed(s, query)
            parts = [self._part(s, p, uploads.get(i)) for i, p in enumerate(query.parts)]
            try:
                hits = s.search(text=query.text, image=image, k=query.k, kind=query.kind, rerank_k=query.rerank_k,
                                parts=parts, filters=query.filters, refine=query.refine, rerank=query.rerank)
            except QueryError as e:
                message = str(e)  # the temporary files' names mean nothing to the client: name its uploads
                for path, name in [(upload, query.image_name), *((f, query.parts[i].image_name)
                                                                 for i, f in uploads.items())]:
                    message = message.replace(str(path), name) if path is not None else message
                if message == str(e):
                    raise
                raise QueryError(message) from None
            t = s.timings
            timings = {"encode_ms": t.encode_ms, "recall_ms": t.recall_ms, "rerank_ms": t.rerank_ms,
                       "total_ms": 1e3 * (time.perf_counter() - start)}
            reranked = any(h.match_logit is not None for h in hits)
            unmigrated = s.unmigrated() if query.filters.needs_metadata else 0
            return Answer(hits, s.snapshot.manifest.generation, reranked, timings,
                          query.rerank and s.calibration.calibrated, unmigrated)

    def info(self) -> dict[str, Any]:
        """What `itm-index info --json` shows, for the generation queries read now."""
        with self._lock:
            self._update()
            searcher = self._searcher
        return index_info(searcher.snapshot if searcher is not None else Snapshot.open(self.index_dir))

    def image(self, row_id: int) -> tuple[IndexedImage, bytes]:
        """An indexed image and its file's bytes, checked against the index."""
        image = find_image(self._snapshot(), row_id)
        return image, read_image(image)

    def thumbnail(self, row_id: int) -> tuple[IndexedImage, bytes]:
        """An indexed image and its JPEG thumbnail."""
        image = find_image(self._snapshot(), row_id)
        return image, self.thumbnails.get(image)

    def generation(self) -> int | None:
        """The generation queries read now (None while the index is empty)."""
        searcher = self._searcher
        return searcher.snapshot.manifest.generation if searcher is not None else None

    # ---- inside ---------------------------------------------------------------------------
    def _check(self, query: Query) -> None:
        given = [x is not None for x in (query.text, query.image, query.image_id, query.image_path)]
        if sum(given) > 1 or (sum(given) == 0 and not query.parts):
            raise QueryError("give one query: a text, an image, or an indexed image's id or path")
        for p in query.parts:
            if sum(x is not None for x in (p.text, p.image, p.image_id)) != 1:
                raise QueryError("each part of a query holds one of a text, an image, or an indexed image's id")
            if p.image is not None:
                self._check_upload(p.image, p.image_name)
        for name, value in (("k", query.k), ("rerank_k", query.rerank_k)):
            if not 1 <= value <= self.limits.max_k:
                raise QueryError(f"{name} must be between 1 and {self.limits.max_k}, got {value}")
        if query.image is not None:
            self._check_upload(query.image, query.image_name)

    def _check_upload(self, data: bytes, name: str) -> None:
        cap = self.limits.max_upload_bytes
        if len(data) > cap:
            raise TooLargeError(f"{name} is {len(data) / 2**20:.1f} MiB, over this server's cap of "
                                f"{cap / 2**20:.1f} MiB")
        if self.limits.max_pixels >= DEFAULT_MAX_PIXELS:
            return  # the search's own cap, with the message an in-process search gives
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
        except Exception:  # noqa: BLE001 - not an image: the search says so, as it does for a file
            return
        if width * height > self.limits.max_pixels:
            raise TooLargeError(f"{name} is {width} x {height}, over this server's pixel cap of "
                                f"{self.limits.max_pixels}")

    @contextmanager
    def _query_image(self, data: bytes | None) -> Iterator[Path | None]:
        """An upload as a private temporary file for the Searcher to read, removed afterwards."""
        if data is None:
            yield None
            return
        fd, name = tempfile.mkstemp(prefix="itm-query-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            yield Path(name)
        finally:
            os.unlink(name)

    @contextmanager
    def _part_images(self, parts: tuple[QueryPart, ...]) -> Iterator[dict[int, Path]]:
        """The uploaded images of a query's parts as temporary files, by part position."""
        with ExitStack() as stack:
            yield {i: stack.enter_context(self._query_image(p.image)) for i, p in enumerate(parts)
                   if p.image is not None}

    def _part(self, s: Searcher, part: QueryPart, upload: Path | None) -> Part:
        """A part as the Searcher takes it: a text, or an image file (the upload's, or an indexed image's)."""
        if part.text is not None:
            return Part(part.weight, text=part.text)
        return Part(part.weight, image=str(upload or find_image(s.snapshot, part.image_id).path))

    def _indexed(self, s: Searcher, query: Query) -> Path | None:
        """The file of the indexed image a query names; only an image in the index is ever read."""
        if query.image_id is not None:
            return Path(find_image(s.snapshot, query.image_id).path)
        if query.image_path is not None:
            return Path(find_image_by_path(s.snapshot, query.image_path).path)
        return None

    def _current(self) -> Searcher:
        """The Searcher on the newest generation it can take (hold the lock)."""
        self._update()
        if self._searcher is None:
            raise EmptyIndexError(str(self._empty))
        return self._searcher

    def _snapshot(self) -> Snapshot:
        searcher = self._searcher
        if searcher is None:
            raise EmptyIndexError(str(self._empty))
        return searcher.snapshot

    def _update(self, first: bool = False) -> None:
        """Take the newest committed generation if the manifest changed since the last look (hold the lock)."""
        stamp = _stamp(self.index_dir / MANIFEST)
        if stamp == self._stamp and not first:
            return
        self._stamp = stamp
        if self._searcher is not None:
            self._refresh(self._searcher)
            return
        try:
            self._searcher = Searcher(self.index_dir, **self._runtime)
        except EmptyIndexError as e:
            self._empty = e
        except (ItmError, OSError) as e:
            if first:
                raise
            self.refresh_error = str(e)

    def _refresh(self, searcher: Searcher) -> None:
        try:
            searcher.refresh()
            self.refresh_error = None
        except (ItmError, OSError) as e:  # the generation it reads stays, whole
            self.refresh_error = str(e)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a commit replaces the manifest (os.replace gives it a new inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
