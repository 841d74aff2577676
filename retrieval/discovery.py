"""How itm-search finds the server that holds an index open: one small JSON file per index, in the
user's runtime folder.

    $XDG_RUNTIME_DIR/itm/server-<sha256 of the index's real path, 16 hex>.json
    (without XDG_RUNTIME_DIR: $TMPDIR/itm-<uid>/, else /tmp/itm-<uid>/)

itm-serve writes it (atomically) once it listens, and removes it when it stops. A reader trusts
it only when the folder and the file are the user's own and closed to other users' writes, and
when the process it names is alive; it removes one whose process is gone. When no server runs,
looking costs one failed open. Imports nothing heavy: the client path must start fast.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from itm.common.errors import ServerError
from itm.common.paths import runtime_dir


@dataclass(frozen=True)
class ServerInfo:
    url: str  # where the server listens, e.g. http://127.0.0.1:8765
    pid: int  # the server's process
    index: str  # the real path of the index it serves
    device: str  # where its models run (cpu, cuda, ...)
    precision: str  # fp32 | bf16 | fp16
    max_upload_bytes: int  # the largest query image it accepts
    token: str | None = None  # the access token it asks for (beyond loopback); the file is private to the user


def announcement_path(index_dir: Path | str) -> Path:
    """The announcement file of the server for `index_dir` (the same for every path that leads there)."""
    key = hashlib.sha256(os.fsencode(os.path.realpath(index_dir))).hexdigest()[:16]
    return runtime_dir() / f"server-{key}.json"


def announce(index_dir: Path | str, info: ServerInfo) -> Path:
    """Tell itm-search where the server for `index_dir` listens; returns the file written.
    ServerError when another live server is announced for the index."""
    check_none_running(index_dir, info.pid)
    folder = runtime_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private(folder.stat()):
        raise ServerError(f"{folder} is not a folder of your own closed to other users, so itm-search cannot "
                          "trust a server announced there; fix its owner or mode (chmod 700), or set XDG_RUNTIME_DIR")
    path = announcement_path(index_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(info), f)
    os.replace(tmp, path)
    return path


def check_none_running(index_dir: Path | str, pid: int) -> None:
    """ServerError when a live server other than process `pid` is announced for `index_dir`."""
    other = find_server(index_dir)
    if other is not None and other.pid != pid:
        raise ServerError(f"a server for the index at {index_dir} already runs at {other.url} (process {other.pid}); "
                          "use it, or stop it first")


def withdraw(index_dir: Path | str, pid: int) -> None:
    """Remove the announcement for `index_dir` if it is still the one process `pid` wrote."""
    path = announcement_path(index_dir)
    info = _read(path)
    if info is not None and info.pid == pid:
        path.unlink(missing_ok=True)


def find_server(index_dir: Path | str) -> ServerInfo | None:
    """The live server announced for `index_dir`, or None (a stale announcement is removed)."""
    path = announcement_path(index_dir)
    info = _read(path)
    if info is None:
        return None
    if not _alive(info.pid):
        try:
            path.unlink()
        except OSError:
            pass
        return None
    return info


def _read(path: Path) -> ServerInfo | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not (_private(os.fstat(f.fileno())) and _private(os.stat(path.parent))):
            return None
        try:
            raw = json.loads(f.read())
            return ServerInfo(**{x.name: raw[x.name] for x in fields(ServerInfo) if x.name in raw})
        except (ValueError, TypeError, KeyError):
            return None


def _private(st: os.stat_result) -> bool:
    """Owned by this user and writable by no one else."""
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the number
        return False
    except (OverflowError, ValueError):
        return False
    return True
