"""indexer: turns a folder of images or a file of texts into an itm index.

    >>> from indexer import build_index, resolve_model
    >>> build_index("photos/", "idx/", resolve_model("demo")).added
"""
from importlib import import_module

_EXPORTS = {
    "build_index": "build", "BuildOptions": "build", "BuildReport": "build",
    "DualEncoder": "encoder", "Encoded": "encoder",
    "ModelSpec": "models", "resolve_model": "models", "list_models": "models",
    "Snapshot": "store", "default_index_dir": "store",
    "load_image": "images", "scan_images": "scan", "read_texts": "scan",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # resolved on first use, so that `itm-index --help` does not wait for torch
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'indexer' has no attribute {name!r}")
