"""Parallel preparation of corpus items, overlapping with the model's forward pass."""
from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from .errors import DecodeError
from .images import load_image, read_file
from .scan import FileEntry

T = TypeVar("T")
R = TypeVar("R")


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Prepared:
    entry: FileEntry
    hash: str | None = None
    pixels: torch.Tensor | None = None  # (3, S, S), None when the embedding is reused or the item skipped
    error: str | None = None


def prepare_image(entry: FileEntry, preprocess: Callable, min_side: int, max_pixels: int,
                  known: Callable[[str], bool]) -> Prepared:
    """Read once, hash, and decode only when no embedding exists for these bytes yet."""
    try:
        data = read_file(Path(entry.path))
    except DecodeError as e:
        return Prepared(entry, error=str(e))
    h = content_hash(data)
    if known(h):
        return Prepared(entry, h)
    try:
        image = load_image(data, min_side=min_side, max_pixels=max_pixels)
        return Prepared(entry, h, preprocess(image))
    except DecodeError as e:
        return Prepared(entry, h, error=str(e))
    except Exception as e:  # a decoder bug on one file must not stop the build
        return Prepared(entry, h, error=f"cannot decode ({type(e).__name__}: {e})")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, prefetch: int) -> Iterator[R]:
    """Like map(), run by `workers` threads with at most `prefetch` items in flight, in input order."""
    if workers <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="itm-decode") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
