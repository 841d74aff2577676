"""Image metadata read at build time (dimensions, EXIF date, camera, GPS), and format 2 -> 3 migration."""
import json
import os

import pyarrow.parquet as pq
from PIL import Image

from itm.indexer import manifest as manifest_module
from itm.indexer import store
from itm.indexer.build import BuildOptions, build_index
from itm.indexer.compact import compact_index
from itm.indexer.metadata import COLUMNS, read_metadata
from itm.retrieval.filtering import RowColumns
from tests.conftest import write_images


def exif_photo(path, size=(40, 30), make="Canon", model="EOS 5D", taken="2023:05:17 10:11:12", orientation=1,
               gps=((48.0, 51.0, 30.0), "N", (2.0, 21.0, 0.0), "W")):
    """A JPEG with the EXIF tags a camera writes."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = make, model, orientation
    exif.get_ifd(0x8769)[0x9003] = taken
    if gps:
        g = exif.get_ifd(0x8825)
        g[2], g[1], g[4], g[3] = gps
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, "JPEG", exif=exif)
    return path


def test_exif_fields_are_read_and_rotation_swaps_the_sides(tmp_path):
    meta = read_metadata(exif_photo(tmp_path / "a.jpg", orientation=6).read_bytes())
    assert meta == {"width": 30, "height": 40, "taken": "2023-05-17T10:11:12", "camera_make": "Canon",
                    "camera_model": "EOS 5D", "gps_lat": 48.858333333333334, "gps_lon": -2.35}
    plain = tmp_path / "b.png"
    Image.new("RGB", (7, 5)).save(plain)
    assert read_metadata(plain.read_bytes()) == {**dict.fromkeys(COLUMNS), "width": 7, "height": 5}
    assert read_metadata(b"not an image") == dict.fromkeys(COLUMNS)
    bad_date = exif_photo(tmp_path / "c.jpg", taken="0000:00:00 00:00:00", gps=None)
    assert read_metadata(bad_date.read_bytes())["taken"] is None


def by_name(idx):
    return {os.path.basename(os.fsdecode(r["path"])): r for r in store.Snapshot.open(idx).rows.to_pylist()}


def test_a_build_stores_each_images_metadata(tmp_path, tiny_spec):
    folder = tmp_path / "photos"
    write_images(folder, 2, size=(40, 48))
    exif_photo(folder / "cam.jpg", orientation=8)
    build_index(folder, tmp_path / "idx", tiny_spec, BuildOptions(batch_size=4))
    rows = by_name(tmp_path / "idx")
    assert (rows["img000.png"]["width"], rows["img000.png"]["height"], rows["img000.png"]["taken"]) == (48, 40, None)
    cam = rows["cam.jpg"]
    assert (cam["width"], cam["height"], cam["camera_model"], cam["taken"]) == (30, 40, "EOS 5D", "2023-05-17T10:11:12")


def downgrade_to_format_2(idx):
    """Rewrite an index as format 2 wrote it: rows and segments without the metadata columns."""
    m = json.loads((idx / "manifest.json").read_text())
    for name in [m["rows"], *(f"{s}.parquet" for s in m["segments"])]:
        table = pq.read_table(idx / name)
        pq.write_table(table.drop_columns([c for c in COLUMNS if c in table.column_names]), idx / name)
    m["format"] = 2
    (idx / "manifest.json").write_text(json.dumps(m))


def test_a_format_2_index_is_read_at_once_and_migrated_by_the_next_writer(tmp_path, tiny_spec, text_file):
    folder = tmp_path / "photos"
    write_images(folder, 3)
    exif_photo(folder / "cam.jpg")
    idx = tmp_path / "idx"
    build_index(folder, idx, tiny_spec)
    build_index(text_file, idx, tiny_spec)
    before = by_name(idx)
    downgrade_to_format_2(idx)
    snap = store.Snapshot.open(idx)
    assert snap.manifest.format == manifest_module.FORMAT_VERSION
    old = by_name(idx)
    assert all(r[c] is None for r in old.values() for c in COLUMNS)  # read, metadata not yet there
    assert {k: {c: v for c, v in r.items() if c not in COLUMNS} for k, r in old.items()} == \
        {k: {c: v for c, v in r.items() if c not in COLUMNS} for k, r in before.items()}
    assert RowColumns(snap.rows).unmigrated == 4  # the images, not the texts
    gen = snap.manifest.generation
    r = build_index(text_file, idx)  # a build of another source, with nothing to do, migrates the whole index
    assert (r.added, r.updated, r.removed) == (0, 0, 0)
    assert by_name(idx) == before
    assert RowColumns(store.Snapshot.open(idx).rows).unmigrated == 0
    on_disk = json.loads((idx / "manifest.json").read_text())
    assert on_disk["format"] == manifest_module.FORMAT_VERSION and on_disk["generation"] == gen + 1
    assert on_disk["ann"] == json.loads(json.dumps(snap.manifest.to_json()))["ann"]  # the vectors did not move
    downgrade_to_format_2(idx)
    compact_index(idx)  # a compaction migrates it too
    assert by_name(idx) == before
