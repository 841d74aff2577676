"""retrieval: answers queries against an itm index, and trains and evaluates the fusion reranker.

    >>> from retrieval import Searcher
    >>> Searcher("idx/").search(text="a red circle left of a blue square", k=5)
"""
from importlib import import_module

_EXPORTS = {
    "Searcher": "search", "Hit": "search",
    "FusionReranker": "fusion", "FusionConfig": "fusion", "get_fusion_config": "fusion",
    "list_fusion_models": "fusion",
    "ItmLoss": "loss",
    "save_reranker": "checkpoint", "load_reranker": "checkpoint",
    "train": "train", "TrainOptions": "train",
    "load_dataset": "data", "ImageCaptions": "data",
    "embed_dataset": "evaluate", "rank": "evaluate", "recall": "evaluate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # resolved on first use, so that `itm-search --help` does not wait for torch
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
