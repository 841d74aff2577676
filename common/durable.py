"""Files that appear whole or not at all: written beside their final name, fsynced, then renamed into place."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

TMP_SUFFIX = ".tmp"


def write_durably(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temporary file beside `path`, make it durable, and rename it to `path`."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
