"""training: itm-train, itm-eval and itm-calibrate: losses, datasets, the loop, evaluation, calibration, recipes.

    >>> from itm.models import resolve_model
    >>> from itm.training import TrainOptions, load_dataset, train
    >>> train(resolve_model("demo"), load_dataset("karpathy.json", split="train"), "out/", TrainOptions(max_steps=1000))
"""
from itm.common.lazy import lazy_exports

_EXPORTS = {
    "train": "train", "TrainOptions": "options", "ItmLoss": "loss",
    "load_dataset": "data", "ImageCaptions": "data",
    "embed_dataset": "evaluate", "rank": "evaluate", "recall": "evaluate",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
