"""A build and a compaction on a file system that runs out of space: one line that says the disk is full and
where, the previous generation whole and searchable, and once space is freed the same build resumes, encoding
again at most the batch it had not staged. Run on a small tmpfs mounted for the test (as root, as CI runs)."""
import os
import re
import subprocess
import uuid

import pytest

from itm.common.errors import DiskFullError
from itm.common.options import BuildOptions
from itm.indexer.build import build_index
from itm.indexer.compact import compact_index
from itm.indexer.manifest import read_manifest
from itm.retrieval.search import Searcher
from tests.conftest import write_images

FS_BYTES = 6 * 2**20
# bytes left free before a build that writes about 150 kB: most levels stop it, at different files
FREE_LEFT = [0, 8_000, 18_000, 30_000, 45_000, 60_000, 75_000, 90_000, 105_000, 120_000, 135_000, 150_000, 400_000]
NEW, BATCH = 24, 4  # images a build adds, and staged per segment (commit_every)


@pytest.fixture
def small_fs(tmp_path):
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"the disk-full tests mount a small tmpfs, which needs root: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount, leave: int):
    """A ballast file that leaves about `leave` bytes free on the file system."""
    ballast = mount / f"ballast-{uuid.uuid4().hex}"
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(ballast, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
        except OSError:
            pass  # as full as it gets
    return ballast


def test_a_build_on_a_full_disk_stops_cleanly_and_resumes(small_fs, tmp_path, tiny_rerank_spec):
    idx = small_fs / "idx"
    write_images(tmp_path / "first", 4, seed=1)
    build_index(tmp_path / "first", idx, tiny_rerank_spec, BuildOptions(workers=0))  # with a rerank store
    stopped, resumed_staged, stages = [], 0, set()
    for n, leave in enumerate(FREE_LEFT):
        photos = tmp_path / f"new{n}"
        write_images(photos, NEW, seed=100 + n)
        before = read_manifest(idx)
        ballast = fill(small_fs, leave)
        opts = BuildOptions(workers=0, commit_every=BATCH, batch_size=BATCH)
        staged = 0
        try:
            report = build_index(photos, idx, None, opts)
        except DiskFullError as e:
            report = None
            message = str(e)
            name = re.search(r"while writing (\S+);", message).group(1)
            stages.add(name.split(".", 1)[1] if name.startswith("seg-") else re.split(r"[-.]", name)[0])
            assert f"the disk holding {idx} is full" in message and "\n" not in message
            stopped.append(leave)
            after = read_manifest(idx)  # the previous generation, whole: its manifest, rows and files
            assert (after.generation, after.counts) == (before.generation, before.counts)
            assert len(Searcher(idx).search("a red square", k=1000)) == before.counts["image"]
            staged = sum(after.staging.values())  # segments finished before the disk filled
            resumed_staged += staged
        finally:
            ballast.unlink()
        report = report or build_index(photos, idx, None, opts)  # space freed: the same build again
        assert report.added == NEW and report.reused >= staged, (leave, staged, report)  # nothing finished encoded again
        assert read_manifest(idx).counts["image"] == before.counts["image"] + NEW
        assert not [p for p in idx.iterdir() if p.name.endswith(".tmp")]  # no half-written file left behind
    assert len(stopped) >= 10 and resumed_staged, stopped  # >= 10 points where the build ran out of space
    print(f"ran out of space at {len(stopped)} of {len(FREE_LEFT)} fill levels, writing: {sorted(stages)}")
    assert {"emb.npy", "tok.npy"} <= stages and len(stages) >= 4, stages  # embeddings, rerank store, and more


def test_a_compaction_on_a_full_disk_stops_cleanly(small_fs, tmp_path, tiny_spec):
    idx = small_fs / "idx"
    for n in range(4):  # several small segments: worth compacting
        write_images(tmp_path / f"p{n}", 3, seed=n)
        build_index(tmp_path / f"p{n}", idx, tiny_spec, BuildOptions(workers=0))
    before = read_manifest(idx)
    ballast = fill(small_fs, 0)
    with pytest.raises(DiskFullError, match="is full"):
        compact_index(idx)
    assert read_manifest(idx).generation == before.generation
    ballast.unlink()
    compact_index(idx)
    assert read_manifest(idx).counts == before.counts
