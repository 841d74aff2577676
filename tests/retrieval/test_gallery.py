"""Indexed images by row id: only what was indexed is ever read back, and thumbnails are cached by content."""
import io
import os
import shutil
import threading

import pytest
from PIL import Image

from itm.common.errors import NotInIndexError
from itm.indexer.build import BuildOptions, build_index
from itm.indexer.store import Snapshot
from itm.retrieval.gallery import Thumbnails, find_image, find_image_by_path, media_type, read_image
from tests.conftest import write_images


@pytest.fixture
def index(tmp_path, tiny_spec, text_file):
    folder = tmp_path / "photos"
    write_images(folder, 4, size=(600, 300))
    shutil.copy(folder / "img001.png", folder / "copy.png")
    build_index(folder, tmp_path / "idx", tiny_spec, BuildOptions(workers=1))
    build_index(text_file, tmp_path / "idx", tiny_spec, BuildOptions(workers=1))
    return tmp_path / "idx"


def images(snap):
    return {r["id"]: os.fsdecode(r["path"]) for r in snap.rows.to_pylist() if r["kind"] == "image"}


def test_found_by_id_and_by_path_and_read_exactly(index):
    snap = Snapshot.open(index)
    for row_id, path in images(snap).items():
        found = find_image(snap, row_id)
        assert found.path == path and find_image_by_path(snap, path) == found
        assert read_image(found) == open(path, "rb").read() and media_type(read_image(found)) == "image/png"
    texts = [r["id"] for r in snap.rows.to_pylist() if r["kind"] == "text"]
    for missing in (texts[0], -1, 10**12):
        with pytest.raises(NotInIndexError, match=f"no image with id {missing} in the index"):
            find_image(snap, missing)
    for path in ("/etc/passwd", str(index / "manifest.json"), str(index.parent / "photos" / ".." / "photos")):
        with pytest.raises(NotInIndexError, match="is not an indexed image"):
            find_image_by_path(snap, path)


def test_a_file_changed_or_replaced_since_indexing_is_not_sent(index, tmp_path):
    snap = Snapshot.open(index)
    by_path = {p: find_image(snap, i) for i, p in images(snap).items()}
    paths = sorted(by_path)
    for p, name in ((paths[0], "edited.png"), (paths[1], "secret.txt")):  # same size, other bytes
        (tmp_path / name).write_bytes(open(p, "rb").read()[:-1] + b"!")
    os.replace(tmp_path / "edited.png", paths[0])
    os.unlink(paths[1])
    os.symlink(tmp_path / "secret.txt", paths[1])  # a link to a file outside the corpus
    os.unlink(paths[2])
    os.mkfifo(paths[2])  # a pipe: must not block the reader
    os.unlink(paths[3])  # gone
    for p in paths[:4]:
        with pytest.raises(NotInIndexError, match="changed or went away since it was indexed; run `itm-index build`"):
            read_image(by_path[p])


def test_thumbnails_are_small_jpegs_made_once_per_content(index):
    snap = Snapshot.open(index)
    by_name = {os.path.basename(p): find_image(snap, i) for i, p in images(snap).items()}
    thumbs = Thumbnails(side=64)
    t = thumbs.get(by_name["img001.png"])
    im = Image.open(io.BytesIO(t))
    assert im.format == "JPEG" and im.size == (32, 64)  # 300 x 600, the longer side to 64
    assert thumbs.get(by_name["copy.png"]) is t  # same bytes indexed twice: one thumbnail
    os.unlink(by_name["img001.png"].path)
    assert thumbs.get(by_name["img001.png"]) is t  # cached from the verified bytes

    small = Thumbnails(side=64, budget=1)  # keeps only the latest
    a, b = by_name["img000.png"], by_name["img002.png"]
    small.get(a)
    small.get(b)
    assert list(small._cache) == [b.hash]

    results, errors = [], []

    def fetch():
        try:
            results.append(Thumbnails(side=32).get(a))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and len(set(results)) == 1
