"""Damaged files: itm-index check names each one, a search that meets one says which file and what to run (never a
traceback), and the next build repairs it, encoding again only the items the damaged file held."""
import shutil

import numpy as np
import pytest

from itm.common.errors import IndexDamagedError, IndexFormatError, ItmWarning
from itm.common.options import BuildOptions
from itm.indexer.build import build_index
from itm.indexer.check import check_index
from itm.indexer.manifest import read_manifest
from itm.retrieval.search import Searcher
from tests.conftest import write_images

OPTS = BuildOptions(workers=0, commit_every=4, batch_size=4)  # a few segments of 4 rows


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_rerank_spec):
    root = tmp_path_factory.mktemp("pristine")
    write_images(root / "photos", 8)
    (root / "caps.txt").write_text("a red square\na blue circle\na green triangle\n")
    (root / "photos" / "broken.png").write_bytes(b"not an image")  # a skipped file: the skipped list has a row
    build_index(root / "photos", root / "idx", tiny_rerank_spec, OPTS)
    build_index(root / "caps.txt", root / "idx", tiny_rerank_spec, OPTS)
    return root


def _segment_of(manifest, kind: str, idx) -> str:
    import pyarrow.parquet as pq

    return next(s for s in sorted(manifest.segments)
                if pq.read_table(idx / f"{s}.parquet", columns=["kind"]).column("kind")[0].as_py() == kind)


def cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path):
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])  # the last embedding values: the header still parses
    path.write_bytes(bytes(data))


DAMAGE = {  # name -> (the file it damages, given the manifest; how; items a repair must encode again)
    "image embeddings cut short": (lambda m, i: f"{_segment_of(m, 'image', i)}.emb.npy", cut, 4),
    "rerank store cut short": (lambda m, i: f"{_segment_of(m, 'image', i)}.tok.npy", cut, 4),
    "embeddings changed, same size": (lambda m, i: f"{_segment_of(m, 'image', i)}.emb.npy", flip, 4),
    "text mask missing": (lambda m, i: f"{_segment_of(m, 'text', i)}.mask.npy", lambda p: p.unlink(), 3),
    "segment rows cut short": (lambda m, i: f"{_segment_of(m, 'image', i)}.parquet", cut, 4),
    # the live rows are lost: the source built first comes back by content hash from the whole segments, whose
    # unused rest that build's commit then drops, so the captions built next are encoded again
    "index rows cut short": (lambda m, i: m.rows, cut, 3),
    "FAISS file missing": (lambda m, i: m.ann["image"].file, lambda p: p.unlink(), 0),
    "FAISS file cut short": (lambda m, i: m.ann["text"].file, cut, 0),
    "skipped list cut short": (lambda m, i: m.skipped, cut, 0),
    "reranker copy missing": (lambda m, i: m.reranker.file, lambda p: p.unlink(), 0),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_file_is_named_and_the_next_build_repairs_it(pristine, tmp_path, kind):
    idx = tmp_path / "idx"
    shutil.copytree(pristine / "idx", idx)
    manifest = read_manifest(idx)
    which, damage, encode_again = DAMAGE[kind]
    name = which(manifest, idx)
    damage(idx / name)

    report = check_index(idx)
    assert name in [n for n, _ in report.damaged] and report.hashed

    try:  # a search names the file (a change of the same size is for check to find: searches do not hash)
        Searcher(idx).search("a red square", k=3)
    except IndexDamagedError as e:
        assert name in str(e) and "itm-index check" in str(e) and "\n" not in str(e)

    photos = build_index(pristine / "photos", idx, None, OPTS)
    texts = build_index(pristine / "caps.txt", idx, None, OPTS)
    assert check_index(idx).damaged == []
    after = read_manifest(idx)
    assert after.counts == manifest.counts
    reencoded = photos.added + photos.updated + texts.added + texts.updated - photos.reused - texts.reused
    assert reencoded == encode_again, (photos, texts)
    hits = Searcher(idx).search("a red square", k=20)
    assert len(hits) == 8 and len(np.unique([h.path for h in hits])) == 8


def test_a_damaged_manifest_is_read_from_its_copy_and_written_anew(pristine, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(pristine / "idx", idx)
    counts = read_manifest(idx).counts
    (idx / "manifest.json").write_text('{"format": 3, "model": ')
    named = dict(check_index(idx).damaged)
    assert named["manifest.json"].startswith("is corrupt")
    with pytest.warns(ItmWarning, match="manifest.json is corrupt .* read its copy manifest.copy.json"):
        assert len(Searcher(idx).search("a red square", k=20)) == 8  # searches go on from the copy
    with pytest.warns(ItmWarning):
        build_index(pristine / "photos", idx, None, OPTS)  # nothing else changed: the commit writes it anew
    assert check_index(idx).damaged == [] and read_manifest(idx).counts == counts


def test_a_manifest_and_its_copy_both_damaged_are_named_everywhere(pristine, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(pristine / "idx", idx)
    for name in ("manifest.json", "manifest.copy.json"):
        (idx / name).write_text('{"format": 3, "model": ')
    with pytest.raises(IndexDamagedError, match="manifest.json cannot be read"):
        check_index(idx)
    with pytest.raises(IndexFormatError, match="manifest.json is corrupt .* and so is its copy"):
        Searcher(idx)
    with pytest.raises(IndexFormatError, match="manifest.json is corrupt .* and so is its copy"):
        build_index(pristine / "photos", idx, None, OPTS)


def test_a_compaction_refuses_a_damaged_index(pristine, tmp_path):
    from itm.indexer.compact import compact_index

    idx = tmp_path / "idx"
    shutil.copytree(pristine / "idx", idx)
    cut(idx / f"{_segment_of(read_manifest(idx), 'image', idx)}.emb.npy")
    with pytest.raises(IndexDamagedError, match="itm-index build SOURCE"):
        compact_index(idx)


def test_the_commands_name_the_damage_in_one_line(pristine, tmp_path):
    from tests.cli.test_cli import run

    idx = tmp_path / "idx"
    shutil.copytree(pristine / "idx", idx)
    ok = run("itm-index", "check", "--index", idx)
    assert ok.returncode == 0 and "ok," in ok.stdout and "sha256" in ok.stdout, ok.stderr
    name = f"{_segment_of(read_manifest(idx), 'image', idx)}.emb.npy"
    cut(idx / name)
    bad = run("itm-index", "check", "--index", idx)
    assert bad.returncode == 1 and f"damaged: {idx / name} is " in bad.stdout and "itm-index build" in bad.stderr
    search = run("itm-search", "a red square", "--index", idx, "--no-server")
    assert search.returncode == 1 and name in search.stderr and search.stderr.count("\n") == 1, search.stderr
    assert "Traceback" not in search.stderr + bad.stderr
    rebuild = run("itm-index", "build", pristine / "photos", "--index", idx, "-q")  # no "nothing changed" shortcut
    assert rebuild.returncode == 0 and "repairing" in rebuild.stderr and " 4 added" in rebuild.stdout, rebuild.stderr
    assert run("itm-index", "check", "--index", idx).returncode == 0


def test_an_index_without_digests_names_the_file_it_cannot_open(pristine, tmp_path):
    """An index from before digests were kept: the sizes say nothing, so the search reads what each file holds."""
    import json

    idx = tmp_path / "idx"
    shutil.copytree(pristine / "idx", idx)
    for name in ("manifest.json", "manifest.copy.json"):
        raw = json.loads((idx / name).read_text())
        raw.pop("digests")
        (idx / name).write_text(json.dumps(raw))
    name = f"{_segment_of(read_manifest(idx), 'image', idx)}.emb.npy"
    cut(idx / name)
    with pytest.raises(IndexDamagedError, match=f"{name} cannot be read"):
        Searcher(idx)

