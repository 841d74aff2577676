"""The Ray engine on a local Ray cluster (2 CPUs, one for the module): the same index as a local build.

Oracle: a single-process build of the same folder and text file. Rows, skips and counts must be
the same, and embeddings equal within float tolerance; a worker killed mid-build must leave the
previous index as it was, and the next build must resume from the segments already written.
"""
import os
import shutil

import numpy as np
import pytest
import ray

import itm.indexer.ray_engine as ray_engine
from itm.common.errors import ItmError
from itm.common.options import RayOptions
from itm.data.corpora import make_hostile_folder
from itm.indexer import store
from itm.indexer.build import BuildOptions, build_index
from itm.retrieval.search import Searcher
from tests.conftest import write_images

SMALL = dict(batch_size=4, commit_every=6)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(export_cache_dir, tmp_path_factory):
    """One local cluster for the module; its workers see the tests' caches, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("ray-home")
        mp.setenv("HOME", str(home))
        mp.setenv("ITM_CACHE_DIR", str(export_cache_dir))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("OMP_NUM_THREADS", "1")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def build(src, idx, spec, ray_opts=None, **kw):
    skips = []
    r = build_index(src, idx, spec, BuildOptions(**{**SMALL, **kw}, ray=ray_opts),
                    on_skip=lambda p, why: skips.append((p, why)))
    return r, skips


def contents(idx):
    """Rows by (kind, path, source id) without their place in segments, their embeddings, and the skips."""
    snap = store.Snapshot.open(idx)
    rows = snap.rows.to_pylist()
    emb = snap.gather(np.arange(len(rows)), "emb")
    keyed = {(r["kind"], r["path"], r["source_id"]): (r, e) for r, e in zip(rows, emb)}
    plain = {k: {c: v for c, v in r.items() if c not in ("segment", "offset")} for k, (r, _) in keyed.items()}
    return plain, {k: e for k, (_, e) in keyed.items()}, snap.skipped.to_pylist()


def assert_same_index(idx_ray, idx_local):
    rows_r, emb_r, skips_r = contents(idx_ray)
    rows_l, emb_l, skips_l = contents(idx_local)
    assert rows_r == rows_l  # ids included: Ray keeps the scan order
    for k in rows_l:
        np.testing.assert_allclose(emb_r[k], emb_l[k], atol=1e-5)
    assert skips_r == skips_l


def report(r):
    return (r.added, r.updated, r.removed, r.unchanged, r.skipped, r.reused, r.images, r.texts)


def test_ray_build_equals_a_local_build_and_updates_the_same_way(tmp_path, tiny_spec, text_file):
    folder = tmp_path / "photos"
    write_images(folder, 20)
    shutil.copy(folder / "img001.png", folder / "copy_of_1.png")  # same bytes: encoded once
    make_hostile_folder(folder / "odd")  # unreadable, truncated, mislabelled files...: the same skips
    idx_r, idx_l = tmp_path / "ray", tmp_path / "local"
    rr, skips_r = build(folder, idx_r, tiny_spec, RayOptions(actors=2))
    rl, skips_l = build(folder, idx_l, tiny_spec)
    assert report(rr) == report(rl) and rl.skipped > 0 and rl.reused >= 1
    assert skips_r == skips_l
    assert report(build(text_file, idx_r, tiny_spec, RayOptions(actors=2))[0]) == \
        report(build(text_file, idx_l, tiny_spec)[0])
    assert_same_index(idx_r, idx_l)
    files = sorted(folder.glob("img*.png"))
    files[0].unlink()  # removed
    write_images(folder / "new", 3, seed=7)  # added
    write_images(tmp_path / "other", 1, seed=9, size=(30, 30))[0].replace(files[3])  # changed bytes
    rr, _ = build(folder, idx_r, tiny_spec, RayOptions(actors=2))
    rl, _ = build(folder, idx_l, tiny_spec)
    assert report(rr) == report(rl) and (rl.added, rl.updated, rl.removed) == (3, 1, 1)
    assert_same_index(idx_r, idx_l)
    assert report(build(folder, idx_r, tiny_spec, RayOptions(actors=2))[0])[:3] == (0, 0, 0)  # nothing to do


def test_a_killed_worker_leaves_the_index_as_it_was_and_the_next_build_resumes(tmp_path, tiny_spec, monkeypatch):
    folder = tmp_path / "photos"
    write_images(folder, 6)
    idx = tmp_path / "idx"
    build(folder, idx, tiny_spec, RayOptions(actors=1))
    before = (idx / "manifest.json").read_bytes()
    write_images(folder / "more", 18, seed=3)
    monkeypatch.setattr(ray_engine, "FAULT_AFTER_BATCHES", 3)  # SIGKILL at the third batch: two segments written
    with pytest.raises(ItmError, match="failed.*index is as it was"):
        build(folder, idx, tiny_spec, RayOptions(actors=1, retries=0))
    m = store.Snapshot.open(idx).manifest
    assert m.generation == 1 and m.counts["image"] == 6  # the last committed generation, whole
    assert Searcher(idx).search(image=folder / "img002.png", k=1, kind="image")[0].path == str(folder / "img002.png")
    assert (idx / "manifest.json").read_bytes() == before or m.staging  # at most staged segments were added
    monkeypatch.setattr(ray_engine, "FAULT_AFTER_BATCHES", None)
    r, _ = build(folder, idx, tiny_spec, RayOptions(actors=1))
    assert (r.added, r.images) == (18, 24)
    assert r.reused >= 12  # the two segments the dead actor finished: not read, decoded or encoded again
    local = tmp_path / "local"
    build(folder, local, tiny_spec)
    rows_r, emb_r, _ = contents(idx)
    rows_l, emb_l, _ = contents(local)
    strip = lambda rows: {k: {c: v for c, v in r.items() if c != "id"} for k, r in rows.items()}  # noqa: E731
    assert strip(rows_r) == strip(rows_l)  # resumed rows come first: ids differ, rows do not
    for k in rows_l:
        np.testing.assert_allclose(emb_r[k], emb_l[k], atol=1e-5)
    assert not [p for p in os.listdir(idx) if p.startswith("seg-") and p.endswith(".parquet")
                and p[:-8] not in store.Snapshot.open(idx).manifest.segments]  # every written segment is used


def test_a_killed_worker_is_restarted_and_its_batch_retried(tmp_path, tiny_spec, monkeypatch):
    folder = tmp_path / "photos"
    write_images(folder, 12)
    monkeypatch.setattr(ray_engine, "FAULT_AFTER_BATCHES", 2)  # every life of the actor dies at its second batch
    r, _ = build(folder, tmp_path / "idx", tiny_spec, RayOptions(actors=1, retries=5), commit_every=4)
    assert (r.added, r.images) == (12, 12)


def test_the_command_takes_engine_ray(tmp_path):
    """itm-index build --engine ray, in this process so that it joins the module's cluster."""
    from typer.testing import CliRunner

    from itm.indexer.cli import app

    write_images(tmp_path / "photos", 5)
    args = ["build", str(tmp_path / "photos"), "--index", str(tmp_path / "idx"), "--model", "itm-tiny",
            "--pretrained", "random", "-q", "--engine", "ray", "--ray-actors", "1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "5 added" in r.stdout, r.output
    r = CliRunner().invoke(app, [*args[:-4], "--engine", "spark"])
    assert r.exit_code == 2 and "unknown engine" in r.output
