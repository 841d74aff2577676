"""FAISS indexes: chosen by corpus size, named by factory strings, recall measured against exact search."""
from __future__ import annotations

import math

import faiss
import numpy as np
import numpy.typing as npt

from .errors import ItmError

Embeddings = npt.NDArray[np.float32]

EXACT_MAX = 20_000  # below this one exact query costs a few ms on 2 CPU cores (25-64 ms at 100k x 512)
HNSW_MAX = 2_000_000  # beyond this HNSW's graph costs too much memory; switch to IVF
HNSW_EF_SEARCH = 128
IVF_NPROBE = 32
RECALL_SAMPLE = 256


def choose_factory(n: int) -> str:
    """Exact while small, HNSW while it fits in memory, IVF beyond (as autofaiss does)."""
    if n < EXACT_MAX:
        return "Flat"
    if n < HNSW_MAX:
        return "HNSW32"
    return f"IVF{2 ** round(math.log2(4 * math.sqrt(n)))}_HNSW32,Flat"


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
    n, dim = vectors.shape
    if n == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    sample = vectors[rng.choice(n, size=min(RECALL_SAMPLE, n), replace=False)]  # (m, dim)
    sims, _ = exact.search(sample, min(2, n))
    gap = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sims[:, -1]))  # (m,) distance to the nearest other unit vector
    direction = rng.standard_normal(sample.shape).astype(np.float32)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    queries = sample + gap[:, None] * direction
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = min(k, n)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth, found))
    return hits / truth.size


def to_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """faiss-gpu when it is installed and a GPU is present; the same index on the CPU otherwise."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except RuntimeError:
        return index  # index types without a GPU implementation stay on the CPU


def _min_train(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return ivf.nlist if ivf is not None else 1
