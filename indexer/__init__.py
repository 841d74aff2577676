"""indexer: turns a folder of images or a file of texts into an itm index, and keeps it.

    >>> from itm.indexer import build_index
    >>> from itm.models import resolve_model
    >>> build_index("photos/", "idx/", resolve_model("demo")).added
"""
from itm.common.lazy import lazy_exports

_EXPORTS = {
    "build_index": "build", "BuildReport": "build", "BuildTimings": "build", "BuildOptions": "itm.common.options",
    "compact_index": "compact", "CompactReport": "compact",
    "Manifest": "manifest", "read_manifest": "manifest", "Snapshot": "store",
    "scan_images": "scan", "read_texts": "scan",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
