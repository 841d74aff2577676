"""FAISS indexes: chosen by corpus size, named by factory strings, recall measured against exact search."""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterator

import faiss
import numpy as np
import numpy.typing as npt

from itm.common.errors import ItmError

Embeddings = npt.NDArray[np.float32]

EXACT_MAX = 20_000  # below this one exact query costs a few ms on 2 CPU cores (25-64 ms at 100k x 512)
HNSW_MAX = 2_000_000  # beyond this HNSW's graph costs too much memory; switch to IVF
HNSW_EF_SEARCH = 128
IVF_NPROBE = 32  # in-memory IVF indexes; on-disk ones (indexer/ivf_disk.py) record the nprobe chosen for them
RECALL_SAMPLE = 256
RECALL_TARGET = 0.95  # recall@10 against exact search that an IVF index's nprobe is chosen to reach
PQ_BELOW = 0.9  # recall targets below this take PQ codes (dim/8 bytes a vector) instead of SQ8 (dim bytes)


def choose_factory(n: int, dim: int | None = None, recall_target: float = RECALL_TARGET) -> str:
    """Exact while small, HNSW while it fits in memory, IVF beyond, on disk (as autofaiss does).

    An IVF index gets about 4 sqrt(n) lists and SQ8 codes, whose recall stays close to exact
    vectors' at a quarter of their size; a recall target below PQ_BELOW takes PQ codes, 8 times
    smaller again, whose recall@10 is capped well below 1 without a refine step.
    """
    if n < EXACT_MAX:
        return "Flat"
    if n < HNSW_MAX:
        return "HNSW32"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    code = f"PQ{dim // 8}" if recall_target < PQ_BELOW and dim and dim % 8 == 0 else "SQ8"
    return f"IVF{nlist}_HNSW32,{code}"


def build_ann(vectors: Embeddings, factory: str | None = None) -> tuple[faiss.Index, str]:
    """An inner-product index over unit vectors; returns the index and its factory string."""
    n, dim = vectors.shape
    factory = factory or choose_factory(n)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ItmError(f"invalid FAISS factory string {factory!r}: {str(e).splitlines()[-1]}") from None
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not index.is_trained:
        if n < _min_train(index):
            raise ItmError(f"FAISS index {factory!r} needs at least {_min_train(index)} vectors to train, "
                           f"the corpus has {n}; pass a smaller --faiss-factory or omit it")
        index.train(vectors)
    index.add(vectors)
    tune(index)
    return index, factory


def tune(index: faiss.Index) -> None:
    """Search-time parameters are not saved by faiss.write_index; set them after every load."""
    params = faiss.ParameterSpace()
    for name, value in (("efSearch", HNSW_EF_SEARCH), ("nprobe", IVF_NPROBE)):
        try:
            params.set_index_parameter(index, name, value)
        except RuntimeError:
            pass  # this index type has no such parameter


def measured_recall(index: faiss.Index, vectors: Embeddings, k: int = 10, seed: int = 0) -> float:
    """Recall@k of `index` against an exact scan, for queries that are not stored in it.

    A stored vector as a query reads high: the index finds its way to the query itself and to
    what lies around it. Each query here is a sampled stored vector moved in a random direction
    by the distance to its nearest other vector, as a new item lands among the old ones.
    """
    n = len(vectors)
    if n == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    blocks = lambda: iter([vectors])  # noqa: E731
    queries = held_out_queries(vectors[rng.choice(n, size=min(RECALL_SAMPLE, n), replace=False)], blocks, rng)
    return recall_of(index, queries, exact_neighbours(queries, blocks, min(k, n)))


def held_out_queries(sample: Embeddings, blocks: Callable[[], Iterator[Embeddings]],
                     rng: np.random.Generator | int = 0) -> Embeddings:
    """Queries near stored vectors but not stored: each of `sample` (stored vectors) moved by the distance
    to its nearest other stored vector. `blocks()` yields every stored vector, a block at a time."""
    rng = np.random.default_rng(rng)
    sample = np.ascontiguousarray(sample, np.float32)  # (m, dim)
    sims, _ = _exact(sample, blocks, 2)
    sims = np.where(sims[:, -1] >= -1.001, sims[:, -1], sims[:, 0])  # a corpus of one: no other vector (-FLT_MAX)
    gap = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sims))  # (m,) distance to the nearest other unit vector
    direction = rng.standard_normal(sample.shape).astype(np.float32)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    queries = sample + gap[:, None] * direction
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def exact_neighbours(queries: Embeddings, blocks: Callable[[], Iterator[Embeddings]], k: int) -> np.ndarray:
    """(m, k) positions of each query's exact top k by inner product, streamed over the blocks (any size)."""
    return _exact(queries, blocks, k)[1]


def recall_of(index: faiss.Index, queries: Embeddings, truth: np.ndarray) -> float:
    """Share of the exact top k (truth, (m, k)) that `index` finds in its own top k."""
    _, found = index.search(queries, truth.shape[1])
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found))
    return hits / truth.size


def _exact(queries: Embeddings, blocks: Callable[[], Iterator[Embeddings]], k: int) -> tuple[np.ndarray, np.ndarray]:
    from faiss.contrib.exhaustive_search import knn_ground_truth  # a heap merged block by block: never all in RAM

    return knn_ground_truth(np.ascontiguousarray(queries, np.float32),
                            (np.ascontiguousarray(b, np.float32) for b in blocks()), k,
                            metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)


def to_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """faiss-gpu when it is installed and a GPU is present; the same index on the CPU otherwise.

    An index whose lists are on disk stays on the CPU: copying it to the GPU would read it all into memory.
    """
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0 or on_disk(index):
        return index
    try:
        return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    except RuntimeError:
        return index  # index types without a GPU implementation (HNSW) stay on the CPU


@functools.cache
def _gpu_resources() -> faiss.StandardGpuResources:
    """One set per process: each reserves scratch memory on the GPU, so every index shares it."""
    return faiss.StandardGpuResources()


def on_disk(index: faiss.Index) -> bool:
    """True for an IVF index whose inverted lists are memory-mapped from a file (indexer/ivf_disk.py)."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def _min_train(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return ivf.nlist if ivf is not None else 1
