"""indexer: turns a folder of images or a file of texts into an itm index.

    >>> from indexer import build_index, resolve_model
    >>> build_index("photos/", "idx/", resolve_model("demo")).added
"""
from .lazy import lazy_exports

_EXPORTS = {
    "build_index": "build", "BuildOptions": "options", "BuildReport": "build", "BuildTimings": "build",
    "compact_index": "compact", "CompactReport": "compact",
    "Manifest": "manifest", "ModelIdentity": "manifest", "read_manifest": "manifest",
    "DualEncoder": "encoder", "Encoded": "encoder",
    "ItemEncoder": "item_encoder", "ItemFeatures": "item_encoder", "Runtime": "item_encoder",
    "load_item_encoder": "item_encoder", "ClipTokenizer": "tokenizer", "ImagePrep": "preprocess",
    "ModelSpec": "models", "resolve_model": "models", "list_models": "models",
    "Snapshot": "store", "default_index_dir": "options",
    "load_image": "images", "scan_images": "scan", "read_texts": "scan",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
