"""Compaction: segments holding dead rows are rewritten with their live rows; nothing a reader sees changes."""
import numpy as np
import pytest

import itm.indexer.commit
from itm.indexer import store
from itm.indexer.build import BuildOptions, build_index
from itm.indexer.compact import compact_index, dead_rows
from itm.retrieval.search import Searcher


def build(src, idx, spec, **kw):
    return build_index(src, idx, spec, BuildOptions(batch_size=4, commit_every=4, workers=1, **kw))


def state(idx):
    """What readers see: each row's id, path and stored embedding, and a search's hits."""
    snap = store.Snapshot.open(idx)
    order = np.argsort(snap.rows.column("id").to_numpy())
    ids = snap.rows.column("id").to_numpy()[order].tolist()
    paths = np.asarray(snap.rows.column("path").to_pylist(), dtype=object)[order].tolist()
    emb = snap.gather(order, "emb")
    hits = [(h.id, round(h.score, 5)) for h in Searcher(idx).search(text="a green square", k=20)]
    return ids, paths, emb, hits


def segment_files(idx):
    return {p.name.split(".")[0] for p in idx.glob("seg-*")}


@pytest.fixture
def thinned(tmp_path, image_folder, tiny_spec):
    """An index of 12 images in 3 segments of 4, from which every other image was then deleted."""
    idx = tmp_path / "idx"
    build(image_folder, idx, tiny_spec)
    for p in sorted(image_folder.rglob("*.png"))[::2]:
        p.unlink()
    r = build(image_folder, idx, tiny_spec, compact_at=2.0)  # never compact
    assert r.removed == 6 and r.compacted == 0
    return idx


def test_compaction_drops_dead_rows_and_changes_nothing_readers_see(thinned):
    old = store.Snapshot.open(thinned)
    assert dead_rows(old.manifest, old.rows) == 6 and len(old.manifest.segments) == 3
    before = state(thinned)
    r = compact_index(thinned)
    assert (r.dead_rows, r.segments_before, r.segments_after) == (6, 3, 1)
    snap = store.Snapshot.open(thinned)
    assert dead_rows(snap.manifest, snap.rows) == 0 and sum(snap.manifest.segments.values()) == 6
    ids, paths, emb, hits = state(thinned)
    assert (ids, paths, hits) == before[:2] + before[3:]
    np.testing.assert_array_equal(emb, before[2])
    assert segment_files(thinned) <= {*snap.manifest.segments, *old.manifest.segments}
    assert compact_index(thinned).dead_rows == 0  # nothing left to do


def test_a_build_compacts_once_dead_rows_pass_the_threshold(tmp_path, image_folder, tiny_spec):
    idx = tmp_path / "idx"
    build(image_folder, idx, tiny_spec)
    files = sorted(image_folder.rglob("*.png"))  # in 3 segments of 4, in this order
    files[5].unlink()  # 1 dead row of 12 stored: under the 25% threshold
    assert build(image_folder, idx, tiny_spec).compacted == 0
    for i in (0, 3, 9):
        files[i].unlink()  # 4 of 12, in every segment (a segment with no live row goes at once, uncompacted)
    r = build(image_folder, idx, tiny_spec)
    assert r.compacted == 4 and r.images == 8
    snap = store.Snapshot.open(idx)
    assert dead_rows(snap.manifest, snap.rows) == 0


def test_a_crash_during_compaction_leaves_the_index_as_it_was(thinned, monkeypatch):
    before = state(thinned)
    generation = store.Snapshot.open(thinned).manifest.generation

    def crash(index_dir, manifest):
        raise KeyboardInterrupt  # new segments written, manifest not yet replaced
    monkeypatch.setattr(itm.indexer.commit, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        compact_index(thinned)
    monkeypatch.undo()
    snap = store.Snapshot.open(thinned)
    assert snap.manifest.generation == generation
    ids, paths, emb, hits = state(thinned)
    assert (ids, paths, hits) == before[:2] + before[3:]
    assert compact_index(thinned).dead_rows == 6
    now = store.Snapshot.open(thinned).manifest
    assert segment_files(thinned) <= {*now.segments, *snap.manifest.segments}  # the crashed run's were collected


def test_each_items_precision_is_kept_through_builds_and_compaction(tmp_path, image_folder, tiny_spec):
    from itm.indexer.info import index_info
    from tests.conftest import write_images

    idx = tmp_path / "idx"
    build(image_folder, idx, tiny_spec)
    assert index_info(store.Snapshot.open(idx))["precision"] == {"fp32": 12}
    added = write_images(image_folder / "more", 4, seed=1)
    build(image_folder, idx, tiny_spec, precision="int8")  # the same index, extended in int8
    assert index_info(store.Snapshot.open(idx))["precision"] == {"fp32": 12, "int8": 4}
    for p in (sorted(image_folder.glob("*.png"))[0], added[0]):
        p.unlink()
    build(image_folder, idx, tiny_spec, compact_at=2.0)  # never compact: the dead rows stay
    compact_index(idx)  # copies the live rows of both kinds of segment into one
    snap = store.Snapshot.open(idx)
    assert len(snap.manifest.segments) == 1 and index_info(snap)["precision"] == {"fp32+int8": 14}


def test_a_segment_written_without_its_precision_reads_as_unrecorded(tmp_path):
    rows = store.SEGMENT_SCHEMA.empty_table()
    store.write_segment(tmp_path, "seg-old", rows, np.zeros((0, 4), np.float32))
    store.write_segment(tmp_path, "seg-new", rows, np.zeros((0, 4), np.float32), precision="bf16")
    assert store.segment_precision(tmp_path, "seg-old") == store.UNRECORDED
    assert store.segment_precision(tmp_path, "seg-new") == "bf16"
