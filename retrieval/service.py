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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from itm.common.errors import EmptyIndexError, ItmError, QueryError, TooLargeError
from itm.common.options import BACKEND, DEVICE, PRECISION, SERVER_MAX_K, SERVER_MAX_QUERIES
from itm.common.paths import default_index_dir
from itm.indexer.info import index_info
from itm.indexer.manifest import MANIFEST
from itm.indexer.store import Snapshot
from itm.models.images import DEFAULT_MAX_PIXELS

from .gallery import IndexedImage, Thumbnails, find_image, read_image
from .hits import Hit
from .query import Query
from .search import Searcher

UPLOAD_NAME = "the uploaded image"


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 32 * 2**20  # largest query image accepted, in bytes
    max_pixels: int = DEFAULT_MAX_PIXELS  # largest query image accepted, width x height (the decoder's cap at most)
    max_k: int = SERVER_MAX_K  # most results, and rerank candidates, per kind
    max_queries: int = SERVER_MAX_QUERIES  # queries inside the server at once (one answered, the rest waiting)


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
        query = query.checked(self.limits.max_k)
        for name, data in [(query.image_name, query.image), *((p.image_name, p.image) for p in query.parts)]:
            if isinstance(data, bytes):
                self._check_upload(data, name or UPLOAD_NAME)
        with self._uploads(query) as (asked, names), self._lock:
            s = self._current()
            try:
                hits = s.run(asked)
            except QueryError as e:
                message = str(e)  # the temporary files' names mean nothing to the client: name its uploads
                for path, name in names.items():
                    message = message.replace(path, name)
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
    def _uploads(self, query: Query) -> Iterator[tuple[Query, dict[str, str]]]:
        """The query with each uploaded image (bytes) written to a private temporary file for the Searcher to
        read, removed afterwards; and each file's name -> how messages name the upload."""
        names: dict[str, str] = {}
        with ExitStack() as stack:
            def file(data: str | bytes | None, name: str | None) -> str | bytes | None:
                if not isinstance(data, bytes):
                    return data
                path = stack.enter_context(_temporary_file(data))
                names[path] = name or UPLOAD_NAME
                return path

            parts = tuple(replace(p, image=file(p.image, p.image_name)) for p in query.parts)
            yield replace(query, image=file(query.image, query.image_name), parts=parts), names

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


@contextmanager
def _temporary_file(data: bytes) -> Iterator[str]:
    fd, name = tempfile.mkstemp(prefix="itm-query-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield name
    finally:
        os.unlink(name)
