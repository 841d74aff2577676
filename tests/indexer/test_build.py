import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import itm.indexer.build
import itm.indexer.commit
from itm.common.errors import IndexFormatError, ModelMismatchError
from itm.data.corpora import make_hostile_folder, make_odd_files
from itm.indexer import manifest as manifest_module
from itm.indexer import store
from itm.indexer.build import BuildOptions, build_index
from itm.models.onnx_items import OnnxItemEncoder
from itm.models.registry import resolve_model
from tests.conftest import write_images


def build(src, idx, spec, **kw):
    skips = []
    report = build_index(src, idx, spec, BuildOptions(batch_size=4, **kw), on_skip=lambda p, w: skips.append((p, w)))
    return report, skips


def rows(idx):
    snap = store.Snapshot.open(idx)
    return snap, snap.rows.to_pylist()


def test_first_build_embeds_every_image_and_text(tmp_path, image_folder, text_file, tiny_spec, tiny_encoder):
    idx = tmp_path / "idx"
    r, _ = build(image_folder, idx, tiny_spec)
    assert (r.added, r.images, r.texts, r.skipped) == (12, 12, 0, 0)
    r, _ = build(text_file, idx, tiny_spec)
    assert (r.added, r.images, r.texts) == (4, 12, 4)
    snap, rs = rows(idx)
    texts = [x for x in rs if x["kind"] == "text"]
    assert [t["text"] for t in texts] == text_file.read_text().splitlines()
    # stored embeddings are what the encoder gives for the same text (oracle: one-at-a-time encoding)
    emb = snap.gather(snap.kind_rows("text"), "emb")
    direct = tiny_encoder.encode_texts([t["text"] for t in texts]).embeddings.numpy()
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert snap.manifest.ann["image"].factory == "Flat"
    assert len({x["id"] for x in rs}) == 16


def test_rebuild_embeds_only_new_and_changed_and_removes_deleted(tmp_path, image_folder, tiny_spec):
    idx = tmp_path / "idx"
    build(image_folder, idx, tiny_spec)
    files = sorted(image_folder.rglob("*.png"))
    files[0].unlink()  # removed
    write_images(image_folder / "new", 2, seed=7)  # added
    shutil.copy(files[1], image_folder / "copy_of_1.png")  # added, same bytes: reused
    files[2].rename(image_folder / "renamed.png")  # removed + added, reused
    write_images(tmp_path / "elsewhere", 1, seed=9, size=(30, 30))[0].replace(files[3])  # changed bytes: updated
    r, _ = build(image_folder, idx, tiny_spec)
    assert (r.added, r.updated, r.removed, r.reused) == (4, 1, 2, 2)
    assert r.unchanged == 12 - 2 - 1
    assert r.images == 12 - 1 + 2 + 1
    _, rs = rows(idx)
    paths = {x["path"] for x in rs}
    assert os.fsencode(files[0]) not in paths and os.fsencode(image_folder / "renamed.png") in paths
    r, _ = build(image_folder, idx, tiny_spec)
    assert (r.added, r.updated, r.removed, r.unchanged) == (0, 0, 0, 14)


def test_text_file_rebuild_tracks_lines(tmp_path, text_file, tiny_spec):
    idx = tmp_path / "idx"
    build(text_file, idx, tiny_spec)
    lines = text_file.read_text().splitlines()
    text_file.write_text("\n".join([lines[0], "a brand new caption", lines[2]]) + "\n")
    r, _ = build(text_file, idx, tiny_spec)
    assert (r.added, r.updated, r.removed, r.unchanged) == (0, 1, 1, 2)
    _, rs = rows(idx)
    assert sorted(x["text"] for x in rs) == sorted([lines[0], "a brand new caption", lines[2]])


def test_broken_files_are_skipped_and_recorded(tmp_path, tiny_spec):
    expected = make_odd_files(tmp_path / "odd")
    r, skips = build(tmp_path / "odd", tmp_path / "idx", tiny_spec, max_pixels=50_000_000)
    skipped_names = {os.path.basename(p) for p, _ in skips}
    assert skipped_names == {n for n, o in expected.items() if o == "skip"}
    assert r.images == sum(o == "ok" for o in expected.values())
    recorded = store.Snapshot.open(tmp_path / "idx").skipped.to_pylist()
    assert {os.path.basename(os.fsdecode(s["path"])) for s in recorded} == skipped_names
    assert all(s["reason"] for s in recorded)


def test_a_hostile_folder_is_indexed_or_skipped_item_by_item(tmp_path, tiny_spec):
    root = tmp_path / "hostile"
    expected = make_hostile_folder(root)
    r, skips = build(root, tmp_path / "idx", tiny_spec)
    relative = lambda p: os.path.relpath(os.fsdecode(p), root)  # noqa: E731
    assert {relative(p) for p, _ in skips} == {n for n, o in expected.items() if o == "skip"}
    snap, rs = rows(tmp_path / "idx")
    assert sorted(relative(x["path"]) for x in rs) == sorted(n for n, o in expected.items() if o == "ok")
    assert r.images == len(rs) and r.skipped == len(skips)
    assert {relative(s["path"]): s["reason"] for s in snap.skipped.to_pylist()} == {relative(p): w for p, w in skips}
    reasons = dict((relative(p), w) for p, w in skips)
    assert (reasons["dangling.png"], reasons["loop.png"], reasons["pipe.png"]) == \
        ("broken symlink", "symlink loop", "not a regular file")
    assert reasons["bomb.png"].startswith("image is 20000 x 20000, over the pixel cap")


def test_crash_during_final_commit_leaves_previous_index_and_resumes(tmp_path, image_folder, tiny_spec, monkeypatch):
    idx = tmp_path / "idx"
    build(image_folder, idx, tiny_spec)
    before = json.loads((idx / "manifest.json").read_text())
    write_images(image_folder / "more", 10, seed=3)

    real_write = itm.indexer.commit.write_manifest
    def crash_on_final(index_dir, manifest):
        if not manifest.staging:
            raise KeyboardInterrupt  # like Ctrl-C between staging and the final commit
        real_write(index_dir, manifest)
    monkeypatch.setattr(itm.indexer.commit, "write_manifest", crash_on_final)
    with pytest.raises(KeyboardInterrupt):
        build(image_folder, idx, tiny_spec, commit_every=4)
    monkeypatch.setattr(itm.indexer.commit, "write_manifest", real_write)

    after = json.loads((idx / "manifest.json").read_text())
    assert after["generation"] == before["generation"] and after["rows"] == before["rows"]
    assert after["staging"], "encoded segments were staged for the next build"
    snap, rs = rows(idx)
    assert len(rs) == 12  # readers see the previous snapshot, whole
    snap.gather(snap.kind_rows("image"), "emb")

    calls = []
    real_encode = OnnxItemEncoder.encode_images
    monkeypatch.setattr(OnnxItemEncoder, "encode_images", lambda self, *a: calls.append(1) or real_encode(self, *a))
    r, _ = build(image_folder, idx, tiny_spec)
    assert (r.added, r.reused, r.images) == (10, 10, 22)
    assert calls == []  # nothing re-embedded
    write_images(image_folder / "newer", 1, seed=4)
    build(image_folder, idx, tiny_spec)
    assert calls == [1]  # the encoder that builds run by default is the one watched
    assert not json.loads((idx / "manifest.json").read_text())["staging"]


def test_half_written_files_are_invisible_and_collected(tmp_path, image_folder, tiny_spec):
    idx = tmp_path / "idx"
    build(image_folder, idx, tiny_spec)
    (idx / ".manifest.json.deadbeef.tmp").write_text("{half")
    (idx / "seg-0000.emb.npy").write_bytes(b"partial")
    _, rs = rows(idx)
    assert len(rs) == 12
    write_images(image_folder / "new", 1, seed=5)
    build(image_folder, idx, tiny_spec)  # the next commit collects them
    assert not (idx / "seg-0000.emb.npy").exists() and not (idx / ".manifest.json.deadbeef.tmp").exists()


def test_other_model_and_newer_format_are_refused(tmp_path, image_folder, tiny_spec, tiny_encoder):
    idx = tmp_path / "idx"
    build(image_folder, idx, tiny_spec)
    ckpt = tiny_encoder.save(tmp_path / "tiny.safetensors")
    with pytest.raises(ModelMismatchError, match="was built with itm-tiny/random"):
        build(image_folder, idx, resolve_model("itm-tiny", checkpoint=ckpt))
    m = json.loads((idx / "manifest.json").read_text())
    (idx / "manifest.json").write_text(json.dumps({**m, "format": manifest_module.FORMAT_VERSION + 1}))
    with pytest.raises(IndexFormatError, match="newer than this itm"):
        build(image_folder, idx, tiny_spec)


def test_later_builds_default_to_the_index_model(tmp_path, image_folder, text_file, tiny_spec):
    idx = tmp_path / "idx"
    build(image_folder, idx, tiny_spec)
    r = build_index(text_file, idx)
    assert r.texts == 4


def test_forced_faiss_factory_is_kept(tmp_path, image_folder, tiny_spec):
    idx = tmp_path / "idx"
    build(image_folder, idx, tiny_spec, faiss_factory="HNSW8")
    m = json.loads((idx / "manifest.json").read_text())
    assert m["ann"]["image"]["factory"] == "HNSW8" and 0 <= m["ann"]["image"]["recall_at_10"] <= 1
    write_images(image_folder / "x", 1, seed=5)
    build(image_folder, idx, tiny_spec)
    assert json.loads((idx / "manifest.json").read_text())["ann"]["image"]["factory"] == "HNSW8"


def test_names_that_are_not_utf8_are_indexed_with_their_exact_bytes(tmp_path, tiny_spec):
    folder = tmp_path / "old disk"
    write_images(folder, 3)
    raw_dir = os.fsencode(folder)
    latin1 = raw_dir + b"/caf\xe9 \xe0 la plage.png"  # Latin-1, as copied from an old system
    shutil.copy(sorted(folder.rglob("*.png"))[0], latin1)  # same bytes as an indexed file: reused
    write_images(tmp_path / "x", 1, seed=4)[0].replace(os.fsdecode(raw_dir + b"/\xff\xfe.png"))
    open(raw_dir + b"/bad \x80.png", "wb").write(b"not an image")
    texts = os.fsencode(tmp_path) + b"/l\xe9gendes.txt"
    open(texts, "wb").write(b"a red square\na blue circle\n")
    idx = tmp_path / "idx"
    r, skips = build(folder, idx, tiny_spec)
    assert (r.added, r.images, r.skipped) == (5, 5, 1)
    assert skips == [(os.fsdecode(raw_dir + b"/bad \x80.png"), "not an image (cannot identify format)")]
    r, _ = build(os.fsdecode(texts), idx, tiny_spec)
    assert r.texts == 2
    snap, rs = rows(idx)
    assert {latin1, raw_dir + b"/\xff\xfe.png", texts} <= {x["path"] for x in rs}  # paths are stored as bytes
    assert [s["path"] for s in snap.skipped.to_pylist()] == [raw_dir + b"/bad \x80.png"]
    r, _ = build(folder, idx, tiny_spec)
    assert (r.added, r.removed, r.unchanged) == (0, 0, 5)  # the same paths found again, byte for byte


def downgrade_to_format_1(idx):
    """Rewrite an index as format 1 wrote it: text paths in Parquet, segments as a list of names."""
    m = json.loads((idx / "manifest.json").read_text())
    def as_text(path):
        table = pq.read_table(path)
        for name in ("source", "path"):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, pa.array([None if v is None else os.fsdecode(v)
                                                        for v in table.column(name).to_pylist()], pa.string()))
        pq.write_table(table, path)
    for name in [m["rows"], m["skipped"], *(f"{s}.parquet" for s in m["segments"])]:
        as_text(idx / name)
    m.update(format=1, segments=sorted(m["segments"]), staging=[])
    (idx / "manifest.json").write_text(json.dumps(m))


def test_a_format_1_index_is_migrated(tmp_path, image_folder, tiny_spec):
    idx = tmp_path / "idx"
    build(image_folder, idx, tiny_spec)
    before = rows(idx)[1]
    downgrade_to_format_1(idx)
    snap, after = rows(idx)
    assert snap.manifest.format == manifest_module.FORMAT_VERSION and after == before
    assert sum(snap.manifest.segments.values()) == 12  # row counts read from the segments
    write_images(image_folder / "more", 2, seed=8)
    r, _ = build(image_folder, idx, tiny_spec)
    assert (r.added, r.unchanged, r.images) == (2, 12, 14)
    assert json.loads((idx / "manifest.json").read_text())["format"] == manifest_module.FORMAT_VERSION


def test_a_rebuild_with_nothing_to_do_loads_no_model_and_commits_nothing(tmp_path, image_folder, text_file, tiny_spec,
                                                                         monkeypatch):
    idx = tmp_path / "idx"
    build(image_folder, idx, tiny_spec)
    build(text_file, idx, tiny_spec)
    before = (idx / "manifest.json").read_bytes()
    files = sorted(p.name for p in idx.iterdir())
    monkeypatch.setattr(itm.indexer.build, "load_item_encoder", lambda *a, **k: pytest.fail("a model was loaded"))
    for source in (image_folder, text_file):
        r = build_index(source, idx)  # no model named: the index's own
        assert (r.added, r.updated, r.removed, r.unchanged) == (0, 0, 0, 12 if source == image_folder else 4)
        assert (r.images, r.texts) == (12, 4)
    assert (idx / "manifest.json").read_bytes() == before and sorted(p.name for p in idx.iterdir()) == files
    text_file.write_text(text_file.read_text())  # saved again as it was: new mtime, same lines
    os.utime(text_file, ns=(1, 1))
    r = build_index(image_folder, idx, tiny_spec)  # the index's model named again: checked, not loaded
    assert (r.added, r.unchanged) == (0, 12)
    with pytest.raises(ModelMismatchError, match="was built with itm-tiny/random, not demo"):
        build_index(image_folder, idx, resolve_model("demo"))  # another model: refused before it is loaded
    r = build_index(text_file, idx)
    assert (r.added, r.updated, r.unchanged) == (0, 0, 4)
    assert json.loads((idx / "manifest.json").read_text())["generation"] == json.loads(before)["generation"] + 1


def test_a_listing_fingerprint_tells_an_unchanged_source_and_nothing_else(tmp_path, image_folder, text_file, tiny_spec):
    from itm.indexer.listing import unchanged

    idx, opts = tmp_path / "idx", BuildOptions(batch_size=4)
    build(image_folder, idx, tiny_spec)
    build(text_file, idx, tiny_spec)
    for source, items in ((image_folder, 12), (text_file, 4)):
        manifest, found = unchanged(idx, source.resolve(), opts)
        assert found == items and manifest.counts == {"image": 12, "text": 4}
    assert unchanged(idx, image_folder.resolve(), BuildOptions(exclude=("*.png",))) is None  # other options
    assert unchanged(tmp_path / "nothing-here", image_folder.resolve(), opts) is None

    first = sorted(image_folder.rglob("*.png"))[0]
    os.utime(first, ns=(1, 1))  # touched: the listing differs, and the full comparison runs
    assert unchanged(idx, image_folder.resolve(), opts) is None
    r, _ = build(image_folder, idx, tiny_spec)
    assert (r.added, r.updated, r.unchanged) == (0, 1, 11) and unchanged(idx, image_folder.resolve(), opts)
    write_images(image_folder / "new", 1, seed=7)  # a new file
    assert unchanged(idx, image_folder.resolve(), opts) is None
    r, _ = build(image_folder, idx, tiny_spec)
    assert r.added == 1 and unchanged(idx, image_folder.resolve(), opts)[1] == 13
    (image_folder / "broken.png").write_bytes(b"not an image")  # a source with a skip keeps no fingerprint
    r, _ = build(image_folder, idx, tiny_spec)
    assert r.skipped == 1 and unchanged(idx, image_folder.resolve(), opts) is None
    r, _ = build(image_folder, idx, tiny_spec)  # so each build tries the skipped file again
    assert r.skipped == 1 and r.unchanged == 13
    assert unchanged(idx, text_file.resolve(), opts)[1] == 4  # the other source's fingerprint is kept
