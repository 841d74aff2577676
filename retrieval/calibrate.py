"""Fitting a reranker's calibration on labelled held-out queries, on the candidates it actually judges.

A probability cut (`itm-search --min-prob`) judges the top candidates that recall hands the
reranker, so the calibration is fitted on exactly those: for each held-out query, the top
`rerank_k` of recall, each labelled true or false by the caller's judge of (query, hit).

    >>> logits, labels = candidate_pairs(Searcher("heldout-idx/"), captions, is_true, rerank_k=50)
    >>> cal = calibration.fit(logits, labels, searcher.index_reranker_sha)
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .hits import Hit
from .search import Searcher

Judge = Callable[[str, Hit], bool]  # (query text, image hit) -> does the text truly describe the image?


def candidate_pairs(searcher: Searcher, queries: Sequence[str], is_true: Judge,
                    rerank_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(match logits, labels) of the top `rerank_k` recalled images of every text query, all reranked."""
    if not searcher.has_reranker:
        raise ValueError("calibration needs an index with a reranker")
    logits, labels = [], []
    for q in queries:
        for h in searcher.search(text=q, k=rerank_k, rerank_k=rerank_k):
            logits.append(h.match_logit)
            labels.append(is_true(q, h))
    return np.asarray(logits, np.float64), np.asarray(labels, bool)
