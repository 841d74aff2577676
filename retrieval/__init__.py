"""retrieval: answers queries against an itm index: two-stage search, the server and its page, the client.

    >>> from itm.retrieval import Searcher
    >>> Searcher("idx/").search(text="a red circle left of a blue square", k=5)
"""
from itm.common.lazy import lazy_exports

_EXPORTS = {
    "Searcher": "search", "Hit": "hits", "Part": "query", "Filters": "query", "Refine": "query",
    "rerank_top": "rerank", "SearchService": "service", "create_app": "server", "serve": "server",
    "find_server": "discovery",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
