"""The second stage's ordering: rerank the top k of recall by the fused score, keep the rest in recall order."""
from __future__ import annotations

import numpy as np


def rerank_top(order: np.ndarray, fused: np.ndarray) -> np.ndarray:
    """Candidates in recall order (..., C) and the fused scores of the first k of them (..., k):
    the first k sorted by fused score (ties keep recall order), then the other C - k as recall ranked them.

    >>> rerank_top(np.array([3, 1, 4, 0]), np.array([0.1, 0.9])).tolist()
    [1, 3, 4, 0]
    """
    k = fused.shape[-1]
    top = np.take_along_axis(order[..., :k], np.argsort(-fused, axis=-1, kind="stable"), axis=-1)
    return np.concatenate([top, order[..., k:]], axis=-1)
