"""itm: search images with words, and words with images, on your own machine.

The Python API (itm/api.py) is three calls over the same library the commands use:

    >>> import itm
    >>> report = itm.build("photos/", index="idx/", model="demo")      # embed a folder (again: only what changed)
    >>> hits = itm.search("a dog on a beach", index="idx/", k=5)       # text -> images
    >>> hits = itm.search(image="photo.jpg", index="idx/", kind="text")  # image -> texts
    >>> with itm.open_index("idx/") as index:                          # models loaded once, for many queries
    ...     hits = index.search("two red cars", k=3)

Importing itm imports neither torch, faiss nor onnxruntime: they load with the first call that needs them.
"""
from itm.common.lazy import lazy_exports

_EXPORTS = {
    "build": "itm.api", "search": "itm.api", "open_index": "itm.api", "Index": "itm.api",
    "Hit": "itm.retrieval.hits", "ItmError": "itm.common.errors",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
