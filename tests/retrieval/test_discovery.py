"""How itm-search finds a running server: announced per index, trusted only when private and alive."""
import os
import subprocess
import sys

import pytest

from itm.common.errors import ServerError
from itm.common.paths import runtime_dir
from itm.retrieval.discovery import ServerInfo, announce, announcement_path, find_server, withdraw


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir(mode=0o700)
    return tmp_path / "run" / "itm"


def info(index, pid=None) -> ServerInfo:
    return ServerInfo("http://127.0.0.1:1234", pid or os.getpid(), os.path.realpath(index), "cpu", "fp32", 1000)


def test_announced_found_by_any_path_to_the_index_and_withdrawn(runtime, tmp_path):
    (tmp_path / "idx").mkdir()
    os.symlink(tmp_path / "idx", tmp_path / "link")
    assert find_server(tmp_path / "idx") is None
    path = announce(tmp_path / "idx", info(tmp_path / "idx"))
    assert path.parent == runtime and oct(runtime.stat().st_mode & 0o777) == "0o700"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert find_server(tmp_path / "link") == find_server(tmp_path / "idx") == info(tmp_path / "idx")
    assert find_server(tmp_path / "other") is None
    withdraw(tmp_path / "idx", os.getpid() + 1)  # not ours: stays
    assert path.exists()
    withdraw(tmp_path / "idx", os.getpid())
    assert not path.exists() and find_server(tmp_path / "idx") is None


def test_a_second_live_server_for_one_index_is_refused(runtime, tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        announce(tmp_path / "idx", info(tmp_path / "idx", pid=alive.pid))
        with pytest.raises(ServerError, match=f"already runs at http://127.0.0.1:1234 \\(process {alive.pid}\\)"):
            announce(tmp_path / "idx", info(tmp_path / "idx"))
        announce(tmp_path / "other", info(tmp_path / "other"))  # another index: fine
    finally:
        alive.kill()
        alive.wait()
    announce(tmp_path / "idx", info(tmp_path / "idx"))  # the first one has gone
    assert find_server(tmp_path / "idx").pid == os.getpid()


def test_a_dead_servers_announcement_is_ignored_and_removed(runtime, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = announce(tmp_path / "idx", info(tmp_path / "idx", pid=int(dead.stdout)))
    assert find_server(tmp_path / "idx") is None and not path.exists()


def test_announcements_others_could_write_are_not_trusted(runtime, tmp_path):
    path = announce(tmp_path / "idx", info(tmp_path / "idx"))
    path.chmod(0o666)
    assert find_server(tmp_path / "idx") is None
    path.chmod(0o600)
    runtime.chmod(0o777)
    assert find_server(tmp_path / "idx") is None
    with pytest.raises(ServerError, match="not a folder of your own closed to other users"):
        announce(tmp_path / "idx", info(tmp_path / "idx"))
    runtime.chmod(0o700)
    path.write_text("{not json")
    assert find_server(tmp_path / "idx") is None
    path.unlink()
    os.symlink(tmp_path / "elsewhere.json", path)  # a link planted in place of the file is not followed
    announce(tmp_path / "x", info(tmp_path / "idx")).rename(tmp_path / "elsewhere.json")
    assert find_server(tmp_path / "idx") is None


def test_without_a_runtime_folder_a_private_one_in_tmp(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert runtime_dir() == tmp_path / f"itm-{os.getuid()}"
    assert announcement_path(tmp_path / "idx").parent == runtime_dir()
