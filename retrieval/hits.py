"""A search result, in a module that imports nothing heavy: the in-process search and the client of a
running server (retrieval/client.py) both return these, so that itm-search prints them the same way."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hit:
    id: int  # stable row id in the index
    kind: str  # "image" or "text"
    score: float  # what the results are ranked by: fused score when reranked, else recall score
    recall_score: float  # dual-encoder cosine similarity
    match_logit: float | None  # fusion model's match logit, None when not reranked
    path: str  # image file, or the text file a text came from; os.fsencode(path) gives its exact bytes
    text: str | None  # the text, for text hits
    probability: float | None = None  # calibrated probability that it matches the query (reranked hits)
    duplicates: int = 0  # near-duplicates of it that --dedup hid
