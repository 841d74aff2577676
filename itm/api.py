"""The Python API: build an index, search it by text or by image, read the hits.

Each call takes plain values, as the commands do, and runs the same library code. An index is a
folder (default: ITM_INDEX, else the per-user one); a model is any name `--model` takes (`demo`,
an open_clip architecture with `pretrained=`, or `checkpoint=` a file).

    >>> import itm, tempfile
    >>> idx = tempfile.mkdtemp()
    >>> itm.build(SAMPLES, index=idx, model="demo").added > 0
    True
    >>> top = itm.search("a red circle", index=idx, k=3)
    >>> [h.kind for h in top]
    ['image', 'image', 'image']
    >>> with itm.open_index(idx) as index:
    ...     same = index.search("a red circle", k=3)
    >>> [h.id for h in same] == [h.id for h in top]
    True
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from itm.common.options import BuildOptions
from itm.indexer.manifest import read_manifest, spec_for_index
from itm.models.registry import resolve_model
from itm.retrieval.hits import Hit
from itm.retrieval.query import Query

if TYPE_CHECKING:  # the build and the search load faiss (and a model) when first called, not when itm is imported
    from itm.indexer.build import BuildReport

__all__ = ["Index", "build", "open_index", "search"]


def build(source: Path | str, *, index: Path | str | None = None, model: str | None = None,
          pretrained: str | None = None, checkpoint: Path | str | None = None, reranker: Path | str | None = None,
          **options: Any) -> BuildReport:
    """Add a folder of images, or a text file (txt, jsonl, csv, parquet), to an index; a rebuild encodes only what
    changed. `model` defaults to the index's own, or ViT-B-32 for a new index; `options` are BuildOptions' fields
    (batch_size, workers, precision, exclude, ...)."""
    if model is None and checkpoint is None:
        manifest = read_manifest(Path(index)) if index is not None and Path(index).is_dir() else None
        spec = spec_for_index(manifest, Path(index)) if manifest else resolve_model(reranker=reranker)
    else:
        spec = resolve_model(model or "ViT-B-32", pretrained, checkpoint, reranker)
    from itm.indexer.build import build_index

    return build_index(source, index, spec, BuildOptions(**options))


class Index:
    """An index opened for many queries: its models load once. Use it as a context manager, or just keep it."""

    def __init__(self, index: Path | str | None = None, *, rerank: bool = True, **runtime: Any):
        from itm.retrieval.search import Searcher

        self.searcher = Searcher(index, rerank=rerank, **runtime)  # runtime: device, precision, backend, threads

    def search(self, text: str | None = None, *, image: Path | str | None = None, **query: Any) -> list[Hit]:
        """Hits for words (images by default) or for an image file (texts and images); `query` holds Query's
        other fields: k, kind, rerank_k, rerank, parts, filters, refine."""
        return self.searcher.run(Query(text, str(image) if image is not None else None, **query))

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def open_index(index: Path | str | None = None, **kwargs: Any) -> Index:
    """The index at `index` (default: the per-user one), opened for queries."""
    return Index(index, **kwargs)


def search(text: str | None = None, *, image: Path | str | None = None, index: Path | str | None = None,
           **query: Any) -> list[Hit]:
    """One query against an index, in this process: words -> images, or an image file -> texts and images."""
    return open_index(index).search(text, image=image, **query)
