"""On-disk IVF indexes: filled shard by shard, merged on disk, memory-mapped, nprobe chosen for a recall target."""
import json
import shutil

import faiss
import numpy as np
import pytest

import itm.indexer.ivf_disk as ivf_disk
from itm.indexer import store
from itm.indexer.ann import choose_factory, exact_neighbours, held_out_queries, on_disk, recall_of
from itm.indexer.build import BuildOptions, build_index
from itm.retrieval.search import Searcher
from tests.conftest import write_images
from tests.indexer.test_ann import clustered


def blocks_of(vectors, size):
    return lambda: (vectors[i:i + size] for i in range(0, len(vectors), size))


def test_factory_for_large_corpora_is_ivf_with_codes_chosen_by_recall_target():
    assert choose_factory(10_000_000, 512) == "IVF16384_HNSW32,SQ8"
    assert choose_factory(10_000_000, 512, recall_target=0.8) == "IVF16384_HNSW32,PQ64"
    assert ivf_disk.is_ivf("IVF16384_HNSW32,SQ8") and ivf_disk.is_ivf("PCA64,IVF256,Flat")
    assert not ivf_disk.is_ivf("HNSW32") and not ivf_disk.is_ivf("Flat")


def test_merged_on_disk_index_answers_as_the_same_index_built_in_memory(tmp_path):
    """Oracle: the shards' lists merged on disk hold what one in-memory index of all vectors holds."""
    data = clustered(12_300, dim=32, clusters=200)
    base, held_out = data[:12_000], data[12_000:]
    built = ivf_disk.build_on_disk(blocks_of(base, 5_000), base[:10_000], "IVF64,SQ8", tmp_path / "ann.faiss",
                                   recall_target=0.95)
    assert built.index.ntotal == 12_000 and on_disk(built.index)
    assert (tmp_path / "ann.ivfdata").stat().st_size >= 12_000 * 32  # SQ8: a byte per dimension, on disk
    assert not list(tmp_path.glob(".shards-*"))  # the shard files are gone
    store.write_ann(tmp_path / "ann.faiss", built.index)
    opened = ivf_disk.open_on_disk(tmp_path / "ann.faiss", built.nprobe)
    memory = faiss.index_factory(32, "IVF64,SQ8", faiss.METRIC_INNER_PRODUCT)
    memory.train(base[:10_000])
    memory.add(base)  # trained as the on-disk one was (faiss's k-means is seeded), every vector in memory
    faiss.extract_index_ivf(memory).nprobe = built.nprobe
    d1, i1 = opened.search(held_out, 10)
    d2, i2 = memory.search(held_out, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-5)


def test_nprobe_is_the_smallest_that_reaches_the_target_and_recall_is_measured(tmp_path):
    data = clustered(20_000, dim=32, clusters=300, spread=0.6)
    blocks = blocks_of(data, 8_000)
    built = ivf_disk.build_on_disk(blocks, data[:10_000], "IVF128,Flat", tmp_path / "ann.faiss", recall_target=0.9)
    queries = held_out_queries(data[:ivf_disk.RECALL_SAMPLE], blocks, 0)
    truth = exact_neighbours(queries, blocks, 10)
    ivf = faiss.extract_index_ivf(built.index)
    assert built.recall_at_10 == pytest.approx(recall_of(built.index, queries, truth))
    assert built.recall_at_10 >= 0.9
    if built.nprobe > 1:  # half as many lists falls short of the target
        ivf.nprobe = built.nprobe // 2
        assert recall_of(built.index, queries, truth) < 0.9


def test_exact_neighbours_streamed_over_blocks_equal_one_exact_scan():
    data = clustered(3_000, dim=16, clusters=50)
    queries = data[:40] + 0.01
    exact = faiss.IndexFlatIP(16)
    exact.add(data)
    _, truth = exact.search(queries, 10)
    np.testing.assert_array_equal(exact_neighbours(queries, blocks_of(data, 700), 10), truth)


@pytest.fixture
def ivf_index(tmp_path, tiny_spec, monkeypatch):
    monkeypatch.setattr(ivf_disk, "SHARD_ROWS", 7)  # 30 images: 5 shards merged
    folder = tmp_path / "images"
    write_images(folder, 30)
    idx = tmp_path / "idx"
    build_index(folder, idx, tiny_spec, BuildOptions(batch_size=8, faiss_factory="IVF4,Flat"))
    return folder, idx


def test_build_commits_an_on_disk_ivf_index_that_searches_as_exact_search(ivf_index):
    folder, idx = ivf_index
    m = json.loads((idx / "manifest.json").read_text())["ann"]["image"]
    assert m["factory"] == "IVF4,Flat" and m["ivfdata"] == "ann-image-g1.ivfdata" and m["recall_at_10"] >= 0.95
    assert (idx / m["ivfdata"]).is_file() and 1 <= m["nprobe"] <= 4 and m["recall_target"] == 0.95
    snap = store.Snapshot.open(idx)
    index = snap.ann("image")
    assert on_disk(index) and faiss.extract_index_ivf(index).nprobe == m["nprobe"]
    emb = snap.gather(snap.kind_rows("image"), "emb")
    exact = faiss.IndexFlatIP(emb.shape[1])
    exact.add(emb)
    faiss.extract_index_ivf(index).nprobe = 4  # every list: the exact answer
    np.testing.assert_array_equal(index.search(emb[:5], 5)[1], exact.search(emb[:5], 5)[1])
    hits = Searcher(idx).search(image=folder / "img001.png", k=3, kind="image")
    assert hits[0].path == str(folder / "img001.png")


def test_on_disk_index_survives_a_move_and_later_commits_delete_its_files_only_when_unnamed(ivf_index, tmp_path,
                                                                                             tiny_spec):
    folder, idx = ivf_index
    moved = tmp_path / "moved"
    shutil.move(idx, moved)  # the lists are found beside the index file, not where they were written
    reader = Searcher(moved)
    assert reader.search(image=folder / "img002.png", k=1, kind="image")[0].path == str(folder / "img002.png")
    for i in range(2):  # two more generations: g1's files are deleted, the open reader keeps its map
        write_images(folder / f"more{i}", 2, seed=10 + i)
        build_index(folder, moved, tiny_spec, BuildOptions(batch_size=8))
    assert not (moved / "ann-image-g1.ivfdata").exists() and (moved / "ann-image-g3.ivfdata").exists()
    assert reader.search(image=folder / "img002.png", k=1, kind="image")[0].path == str(folder / "img002.png")
    assert json.loads((moved / "manifest.json").read_text())["ann"]["image"]["factory"] == "IVF4,Flat"


def test_manifest_without_on_disk_index_has_no_new_fields(tmp_path, image_folder, tiny_spec):
    """Indexes that do not use them read as format 2 always did: older itm versions still open them."""
    build_index(image_folder, tmp_path / "idx", tiny_spec, BuildOptions(batch_size=4))
    ann = json.loads((tmp_path / "idx" / "manifest.json").read_text())["ann"]["image"]
    assert set(ann) == {"file", "factory", "metric", "dim", "ntotal", "recall_at_10"}


def test_where_the_code_caps_recall_below_the_target_probing_stops_where_it_stops_paying(tmp_path):
    data = clustered(12_000, dim=32, clusters=100)
    blocks = blocks_of(data, 5_000)
    built = ivf_disk.build_on_disk(blocks, data[:10_000], "IVF256,PQ4", tmp_path / "ann.faiss", recall_target=0.99)
    assert built.recall_at_10 < 0.9 and built.nprobe < 256  # PQ4 codes: recall far below 0.99 at any nprobe
    queries = held_out_queries(data[:ivf_disk.RECALL_SAMPLE], blocks, 0)
    faiss.extract_index_ivf(built.index).nprobe = 256
    assert recall_of(built.index, queries, exact_neighbours(queries, blocks, 10)) - built.recall_at_10 < 0.02
