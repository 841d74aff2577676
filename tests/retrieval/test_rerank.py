"""rerank_top: the first k candidates re-sorted by fused score, the rest in recall order."""
import numpy as np

from itm.retrieval.rerank import rerank_top


def one_at_a_time(order, fused):
    """Oracle: a plain sort of the first k (candidate, score) pairs, ties keeping recall order."""
    k = len(fused)
    top = sorted(range(k), key=lambda i: -fused[i])
    return [order[i] for i in top] + list(order[k:])


def test_worked_example():
    order = np.array([[3, 1, 4, 0, 2], [0, 1, 2, 3, 4]])
    fused = np.array([[0.1, 0.9, 0.5], [0.2, 0.2, 0.7]])
    assert rerank_top(order, fused).tolist() == [[1, 4, 3, 0, 2], [2, 0, 1, 3, 4]]
    assert rerank_top(order[0], fused[0]).tolist() == [1, 4, 3, 0, 2]  # one query


def test_matches_a_sort_one_query_at_a_time():
    rng = np.random.default_rng(0)
    for k in (1, 3, 8, 10):
        order = np.stack([rng.permutation(10) for _ in range(20)])
        fused = rng.integers(0, 4, (20, k)).astype(np.float32)  # many ties
        got = rerank_top(order, fused)
        assert got.tolist() == [one_at_a_time(o, f) for o, f in zip(order, fused)]
