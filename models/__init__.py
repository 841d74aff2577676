"""models: both encoders, the fusion reranker, their ONNX export and the runtimes that run them, model identity.

    >>> from itm.models import resolve_model, load_item_encoder
    >>> encoder = load_item_encoder(resolve_model("demo"))
    >>> encoder.encode_texts(["a dog on a beach"]).embeddings.shape
    (1, 64)
"""
from itm.common.lazy import lazy_exports

_EXPORTS = {
    "ModelSpec": "registry", "resolve_model": "registry", "list_models": "registry", "ModelIdentity": "identity",
    "DualEncoder": "encoder", "Encoded": "encoder",
    "ItemEncoder": "item_encoder", "ItemFeatures": "item_encoder", "Runtime": "item_encoder",
    "load_item_encoder": "loading", "ClipTokenizer": "tokenizer", "ImagePrep": "preprocess",
    "load_image": "images",
    "FusionReranker": "fusion", "FusionConfig": "fusion", "get_fusion_config": "fusion",
    "list_fusion_models": "fusion", "FusionScorer": "fusion_scorer", "load_fusion": "loading",
    "save_reranker": "fusion_checkpoint", "load_reranker": "fusion_checkpoint", "Calibration": "calibration",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
