"""The indexed images a server may send, and their thumbnails.

An image is named by its row id in a generation, never by a path from a request. Its file is
read only when it is a regular file of the size the index recorded, and sent only when its bytes
hash to the content hash the index recorded: whatever a path or a link now points at, nothing
but what was indexed ever leaves the server. Thumbnails are made on demand from those bytes and
cached by content hash (so a copy or a rename shares one, and a changed file gets a new one).
"""
from __future__ import annotations

import io
import os
import stat
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from itm.common.errors import NotInIndexError
from itm.indexer.changes import content_hash
from itm.indexer.store import Snapshot, integers
from itm.models.images import load_image

THUMBNAIL_SIDE = 256  # pixels, the longer side of a thumbnail
THUMBNAIL_CACHE_BYTES = 64 * 2**20  # thumbnails kept in memory, least recently used dropped first
THUMBNAIL_MAKERS = 2  # images decoded for thumbnails at once (a large PNG takes 3 bytes a pixel while it is)
_COLUMNS = ["id", "kind", "path", "size", "hash"]


@dataclass(frozen=True)
class IndexedImage:
    id: int  # row id
    path: str  # the file, as os.fsdecode gives it
    size: int  # bytes, as indexed
    hash: str  # content hash, as indexed


_ids: weakref.WeakKeyDictionary[Snapshot, tuple[np.ndarray, np.ndarray]] = weakref.WeakKeyDictionary()
_ids_lock = threading.Lock()


def find_image(snap: Snapshot, row_id: int) -> IndexedImage:
    """The image with row id `row_id` in this generation; NotInIndexError when there is none."""
    ids, order = _id_order(snap)
    i = int(np.searchsorted(ids, row_id, sorter=order))
    if i < len(ids) and ids[order[i]] == row_id:
        row = snap.rows.select(_COLUMNS).slice(int(order[i]), 1).to_pylist()[0]
        if row["kind"] == "image":
            return _image(row)
    raise NotInIndexError(f"there is no image with id {row_id} in the index (it may have been removed since)")


def find_image_by_path(snap: Snapshot, path: str) -> IndexedImage:
    """The indexed image at `path` (as os.fsdecode gives it); NotInIndexError for any other path."""
    rows = snap.rows.select(_COLUMNS)
    match = rows.filter(pc.and_(pc.equal(rows.column("kind"), "image"),
                                pc.equal(rows.column("path"), pa.scalar(os.fsencode(path), pa.binary()))))
    if not match.num_rows:
        raise NotInIndexError(f"{path} is not an indexed image; the server reads only images in its index")
    return _image(match.slice(0, 1).to_pylist()[0])


def read_image(image: IndexedImage) -> bytes:
    """The image's bytes, exactly as indexed; NotInIndexError when its file changed or went away since."""
    gone = NotInIndexError(f"image {image.id} ({image.path}) changed or went away since it was indexed; "
                           "run `itm-index build` again")
    try:
        fd = os.open(image.path, os.O_RDONLY | os.O_NONBLOCK)  # a pipe put in its place must not block
    except OSError:
        raise gone from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != image.size:
            raise gone
        data = f.read(image.size + 1)
    if len(data) != image.size or content_hash(data) != image.hash:
        raise gone
    return data


def media_type(data: bytes) -> str:
    """The MIME type of an image file's bytes (application/octet-stream when Pillow cannot tell)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return Image.MIME.get(im.format or "", "application/octet-stream")
    except Exception:  # noqa: BLE001 - any header Pillow cannot read
        return "application/octet-stream"


class Thumbnails:
    """JPEG thumbnails of indexed images, made on first request and kept (by content hash) within a byte budget."""

    def __init__(self, side: int = THUMBNAIL_SIDE, budget: int = THUMBNAIL_CACHE_BYTES):
        self.side, self.budget = side, budget
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._makers = threading.BoundedSemaphore(THUMBNAIL_MAKERS)

    def get(self, image: IndexedImage) -> bytes:
        with self._lock:
            if image.hash in self._cache:
                self._cache.move_to_end(image.hash)
                return self._cache[image.hash]
        with self._makers:
            thumb = self._make(read_image(image))
        with self._lock:
            if image.hash not in self._cache:
                self._cache[image.hash] = thumb
                self._bytes += len(thumb)
                while self._bytes > self.budget and len(self._cache) > 1:
                    self._bytes -= len(self._cache.popitem(last=False)[1])
        return thumb

    def _make(self, data: bytes) -> bytes:
        im = load_image(data, min_side=self.side)  # RGB, orientation applied, DecodeError for a bad file
        im.thumbnail((self.side, self.side), Image.LANCZOS)
        out = io.BytesIO()
        im.save(out, "JPEG", quality=85)
        return out.getvalue()


def _image(row: dict) -> IndexedImage:
    return IndexedImage(row["id"], os.fsdecode(row["path"]), row["size"], row["hash"])


def _id_order(snap: Snapshot) -> tuple[np.ndarray, np.ndarray]:
    """The generation's row ids and the order that sorts them, computed once per generation."""
    with _ids_lock:
        if snap not in _ids:
            ids = integers(snap.rows.column("id"))
            _ids[snap] = (ids, np.argsort(ids, kind="stable"))
        return _ids[snap]
