"""Files that appear whole or not at all: written beside their final name, fsynced, then renamed into place.

A write that fails for want of space (ENOSPC, a quota, a short write) leaves nothing behind and raises
DiskFullError, which names the folder and says what to do; the files already in place stay whole.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import DiskFullError

TMP_SUFFIX = ".tmp"


def write_durably(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temporary file beside `path`, make it durable, and rename it to `path`."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with space_checked(path):
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def space_checked(path: Path) -> Iterator[None]:
    """Run a write of `path`; a failure for want of space becomes DiskFullError, naming the folder."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # RuntimeError: faiss's own writes
        if isinstance(e, DiskFullError) or not out_of_space(e):
            raise
        folder = Path(path).parent
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
        except OSError:
            free = "space unknown"
        raise DiskFullError(f"the disk holding {folder} is full ({free}) while writing {Path(path).name}; free some "
                            "space and run the same command again: what was finished is kept") from None


def out_of_space(e: BaseException) -> bool:
    """Whether a failed write failed for want of space: the error number, or the words C libraries, numpy
    (a short write) and Arrow use for it."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(words in text for words in ("No space left", "Disk quota exceeded", "requested and"))


def fsync_dir(d: Path) -> None:
    """Make the renames inside folder `d` durable (best effort where folders cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temporary(name: str) -> bool:
    """A file write_durably left behind when it was interrupted."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)
