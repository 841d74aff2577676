"""Two writers on one index: the second waits for the lock and says so once, or refuses in one line with --no-wait;
builds and compactions that run at once lose nothing, skip no generation, and readers never break."""
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from itm.common.errors import IndexBusyError
from itm.common.options import BuildOptions
from itm.indexer.build import build_index
from itm.indexer.commit import locked
from itm.indexer.compact import compact_index
from itm.indexer.manifest import read_manifest
from itm.retrieval.search import Searcher
from tests.conftest import write_images

TINY = ["--model", "itm-tiny", "--pretrained", "random"]


def itm_index(*args) -> subprocess.Popen:
    exe = shutil.which("itm-index")
    argv = [exe] if exe else [sys.executable, "-c", "import itm.indexer.cli as m; m.main()"]
    return subprocess.Popen(argv + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def index(tmp_path, tiny_spec):
    write_images(tmp_path / "a", 5, seed=1)
    build_index(tmp_path / "a", tmp_path / "idx", tiny_spec, BuildOptions(workers=0))
    return tmp_path / "idx"


def test_a_writer_that_may_not_wait_is_refused_in_one_line(index, tmp_path):
    write_images(tmp_path / "b", 2, seed=2)
    with locked(index):
        with pytest.raises(IndexBusyError, match="another build or compaction is writing to .*leave out --no-wait"):
            build_index(tmp_path / "b", index, None, BuildOptions(workers=0, wait=False))
        with pytest.raises(IndexBusyError):
            compact_index(index, wait=False)
        done = itm_index("build", tmp_path / "b", "--index", index, "--no-wait", "-q")
        out, err = done.communicate(timeout=300)
    assert done.returncode == 1 and err.strip().count("\n") == 0 and "--no-wait" in err, err
    assert read_manifest(index).counts["image"] == 5  # nothing was written


def test_a_second_writer_waits_says_so_once_and_then_builds(index, tmp_path):
    write_images(tmp_path / "b", 3, seed=2)
    generation = read_manifest(index).generation
    with locked(index):
        proc = itm_index("build", tmp_path / "b", "--index", index, "-q")
        waited = proc.stderr.readline()  # the command says it waits, then blocks on the lock
        time.sleep(0.5)
        assert proc.poll() is None, "the second writer did not wait"
    out, err = proc.communicate(timeout=300)
    assert "waiting for it to finish" in waited and proc.returncode == 0, waited + err
    m = read_manifest(index)
    assert m.counts["image"] == 8 and m.generation == generation + 1


def test_writers_at_once_lose_nothing_and_readers_never_break(index, tmp_path, tiny_spec):
    """Two builds of other sources and a compaction, started together, while a reader searches in a loop."""
    for name, seed in (("b", 2), ("c", 3)):
        write_images(tmp_path / name, 4, seed=seed)
    (tmp_path / "caps.txt").write_text("a red square\na blue circle\na green thing\n")
    start = read_manifest(index).generation
    errors, answers, stop = [], [0], threading.Event()

    def read() -> None:
        s = Searcher(index)
        while not stop.is_set():
            try:
                s.refresh()
                s.search("a red square", k=3)
                answers[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is what this test looks for
                errors.append(repr(e))

    reader = threading.Thread(target=read)
    reader.start()
    procs = [itm_index("build", tmp_path / "b", "--index", index, "-q"),
             itm_index("build", tmp_path / "caps.txt", "--index", index, "-q"),
             itm_index("compact", "--index", index),
             itm_index("build", tmp_path / "c", "--index", index, "-q")]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    stop.set()
    reader.join()
    assert all(r[2] == 0 for r in results), results
    m = read_manifest(index)
    assert m.counts == {"image": 13, "text": 3}
    dropped, before, after = map(int, re.search(r"(\d+) dead rows dropped, (\d+) segments -> (\d+)",
                                                results[2][0]).groups())
    compacted = dropped > 0 or before != after  # a compaction with nothing worth doing commits nothing
    assert m.generation == start + 3 + compacted  # each writer committed once, in turn: none skipped, none lost
    assert not errors and answers[0] > 0, errors[:3]
    assert len({h.path for h in Searcher(index).search("a red square", k=20)}) == 13
