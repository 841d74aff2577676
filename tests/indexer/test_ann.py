import faiss
import numpy as np
import pytest

from itm.common.errors import ItmError
from itm.indexer.ann import EXACT_MAX, HNSW_MAX, build_ann, choose_factory, measured_recall


def clustered(n, dim=64, clusters=500, seed=0, spread=0.35):
    """Unit vectors in clusters, as real embeddings are, rather than uniform on the sphere."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_at_10(index, base, queries):
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    _, truth = exact.search(queries, 10)
    _, found = index.search(queries, 10)
    return np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])


def test_factory_follows_corpus_size():
    assert choose_factory(10) == "Flat"
    assert choose_factory(EXACT_MAX) == "HNSW32"
    assert choose_factory(HNSW_MAX).startswith("IVF")


@pytest.mark.parametrize("factory", ["HNSW32", "IVF256,Flat"])
def test_approximate_index_recall_against_exact(factory):
    data = clustered(51_000)
    base, queries = data[:50_000], data[50_000:]  # queries not in the index
    index, used = build_ann(base, factory)
    assert used == factory and index.ntotal == 50_000
    assert recall_at_10(index, base, queries) >= 0.95
    assert measured_recall(index, base) >= 0.95


def test_flat_is_exact():
    base = clustered(2000)
    index, used = build_ann(base)
    assert used == "Flat" and recall_at_10(index, base, base[:50]) == 1.0


def test_bad_factory_and_untrainable_corpus_are_clear_errors():
    with pytest.raises(ItmError, match="invalid FAISS factory"):
        build_ann(clustered(100), "NoSuchIndex")
    with pytest.raises(ItmError, match="needs at least 1024 vectors"):
        build_ann(clustered(100), "IVF1024,Flat")


def test_measured_recall_reads_like_held_out_queries_not_like_stored_ones():
    data = clustered(20_500, dim=32, spread=1.5)  # wide clusters: a new item lands far from every stored one
    base, held_out = data[:20_000], data[20_000:]
    index, _ = build_ann(base, "HNSW8")
    faiss.ParameterSpace().set_index_parameter(index, "efSearch", 16)  # a weak index: recall well below 1
    truth = recall_at_10(index, base, held_out)
    assert recall_at_10(index, base, base[:256]) > truth + 0.1  # a stored vector as a query reads high
    assert abs(measured_recall(index, base) - truth) <= 0.05
