"""retrieval: answers queries against an itm index, and trains and evaluates the fusion reranker.

    >>> from retrieval import Searcher
    >>> Searcher("idx/").search(text="a red circle left of a blue square", k=5)
"""
from indexer.lazy import lazy_exports

_EXPORTS = {
    "Searcher": "search", "Hit": "search", "FusionScorer": "fusion_scorer", "load_fusion": "fusion_scorer",
    "FusionReranker": "fusion", "FusionConfig": "fusion", "get_fusion_config": "fusion",
    "list_fusion_models": "fusion",
    "ItmLoss": "loss",
    "save_reranker": "checkpoint", "load_reranker": "checkpoint",
    "train": "train", "TrainOptions": "train",
    "load_dataset": "data", "ImageCaptions": "data",
    "embed_dataset": "evaluate", "rank": "evaluate", "recall": "evaluate", "rerank_top": "rerank",
    "Part": "query", "Filters": "query", "Refine": "query", "Calibration": "calibration",
    "SearchService": "service", "create_app": "server", "serve": "server", "find_server": "discovery",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
