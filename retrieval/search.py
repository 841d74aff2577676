"""Two-stage search: FAISS recall of the top-k, then fusion reranking of those k.

A query is encoded by the index's own item encoder (indexer/item_encoder.py), as a corpus item
is, and reranked by its fusion scorer (retrieval/fusion_scorer.py); on a CPU both run exported
graphs by default, so a query from the shell imports neither torch nor open_clip.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from indexer import store
from indexer.ann import to_gpu_if_available
from indexer.errors import DecodeError, EmptyIndexError, ModelMismatchError, QueryError
from indexer.item_encoder import ItemFeatures, Runtime, load_item_encoder
from indexer.manifest import check_model, check_reranker, read_manifest
from indexer.models import ModelSpec, spec_for_index
from indexer.options import DEVICE, PRECISION

from .fusion_scorer import load_fusion
from .rerank import rerank_top
from .hits import Hit  # the result type, torch-free for retrieval/client.py
from .settings import DEFAULT_K, DEFAULT_RERANK_K

KINDS = ("image", "text", "all")


@dataclass
class Timings:
    """Where the last query's time went (milliseconds)."""

    encode_ms: float = 0.0
    recall_ms: float = 0.0
    rerank_ms: float = 0.0


@dataclass(frozen=True)
class _Generation:
    """What queries read of one committed generation, swapped whole by Searcher.refresh."""

    snapshot: store.Snapshot
    ann: dict[str, faiss.Index]  # by kind, search parameters set, on the GPU where there is one
    kind_rows: dict[str, np.ndarray]  # row positions of each kind, in the order its ANN index holds them

    @classmethod
    def of(cls, snapshot: store.Snapshot, embed_dim: int) -> _Generation:
        ann = {}
        for kind, meta in snapshot.manifest.ann.items():
            index = snapshot.ann(kind)
            if index.d != meta.dim or index.d != embed_dim:
                raise ModelMismatchError(f"FAISS index {meta.file} in {snapshot.index_dir} has dimension {index.d}, "
                                         f"expected {embed_dim}; rebuild the index")
            ann[kind] = to_gpu_if_available(index)
        return cls(snapshot, ann, {kind: snapshot.kind_rows(kind) for kind in store.KINDS})


class Searcher:
    """Answers queries against one committed generation of an index; `refresh` moves to the latest.

    >>> s = Searcher("idx/")
    >>> [h.path for h in s.search(text="a red circle left of a blue square", k=3)]
    ['/photos/0007.png', '/photos/0131.png', '/photos/0042.png']
    """

    def __init__(self, index_dir: Path | str | None = None, *, model: ModelSpec | None = None,
                 rerank: bool = True, device: str = DEVICE, precision: str = PRECISION, backend: str = "auto",
                 threads: int | None = None):
        self.index_dir = Path(index_dir) if index_dir else store.default_index_dir()
        snapshot = store.Snapshot.open(self.index_dir)
        manifest = snapshot.manifest
        if not sum(manifest.counts.values()):
            raise EmptyIndexError(f"index at {self.index_dir} is empty; add images with `itm-index build FOLDER`")
        runtime = Runtime(backend, device, precision, threads)
        self._reranker_sha = manifest.reranker.sha256 if manifest.reranker else None
        reranker = self.index_dir / manifest.reranker.file if manifest.reranker else None
        # queries get the index's store encoder, so that they are encoded as its items were
        spec = dataclasses.replace(model or spec_for_index(manifest, self.index_dir), reranker=reranker)
        self.encoder = load_item_encoder(spec, runtime, None if model else manifest.model, self._reranker_sha)
        check_model(manifest, self.encoder.identity, self.index_dir)
        self.scorer = load_fusion(reranker, self._reranker_sha, runtime) if rerank and reranker else None
        self._gen = _Generation.of(snapshot, self.encoder.identity.embed_dim)
        self.timings = Timings()

    @property
    def snapshot(self) -> store.Snapshot:
        return self._gen.snapshot

    @property
    def has_reranker(self) -> bool:
        return self.scorer is not None

    def refresh(self) -> bool:
        """Move to the index's latest committed generation, keeping the loaded models; False when already there.

        Queries already running finish on the generation they started with.
        """
        manifest = read_manifest(self.index_dir)
        if manifest is None or manifest.generation == self.snapshot.manifest.generation:
            return False
        snapshot = store.Snapshot.open(self.index_dir)
        check_model(snapshot.manifest, self.encoder.identity, self.index_dir)
        check_reranker(snapshot.manifest, self._reranker_sha, self.index_dir)
        self._gen = _Generation.of(snapshot, self.encoder.identity.embed_dim)
        return True

    def search(self, text: str | None = None, image: Path | str | None = None, k: int = DEFAULT_K,
               kind: str | None = None, rerank_k: int = DEFAULT_RERANK_K) -> list[Hit]:
        """Text -> images (default kind "image"), or image -> texts and images (default kind "all")."""
        if (text is None) == (image is None):
            raise QueryError("give a text query or --image PATH, not both and not neither")
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        kind = kind or ("image" if text is not None else "all")
        if kind not in KINDS:
            raise QueryError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
        t0 = time.perf_counter()
        query = self._encode_text(text) if text is not None else self._encode_image(Path(image))
        self.timings = Timings(encode_ms=1e3 * (time.perf_counter() - t0))
        query_kind = "text" if text is not None else "image"
        gen = self._gen  # one generation for the whole query, whatever refresh does meanwhile
        hits: list[Hit] = []
        for target in (("text", "image") if kind == "all" else (kind,)):
            hits += self._search_kind(gen, query, query_kind, target, k, rerank_k)
        return hits

    def _search_kind(self, gen: _Generation, query: ItemFeatures, query_kind: str, target: str, k: int,
                     rerank_k: int) -> list[Hit]:
        if target not in gen.ann:
            return []
        cross = query_kind != target
        depth = max(k, rerank_k) if (cross and self.scorer is not None) else k
        t0 = time.perf_counter()
        sims, pos = gen.ann[target].search(query.emb, min(depth, gen.ann[target].ntotal))
        keep = pos[0] >= 0
        sims, rows = sims[0][keep], gen.kind_rows[target][pos[0][keep]]
        self.timings.recall_ms += 1e3 * (time.perf_counter() - t0)
        hits = self._hits(gen.snapshot, rows, sims)
        if cross and self.scorer is not None and len(rows):
            t0 = time.perf_counter()
            n = min(rerank_k, len(rows))  # only the top rerank_k are rescored; the rest keep recall order
            logits = self._rerank(gen.snapshot, query, query_kind, rows[:n])
            scores = sims[:n] + self.scorer.weight * logits  # recall + weight x logit, as BLIP combines them
            hits = [dataclasses.replace(h, score=float(s), match_logit=float(g))
                    for h, s, g in zip(hits, scores, logits)] + hits[n:]
            hits = [hits[i] for i in rerank_top(np.arange(len(hits)), scores)]
            self.timings.rerank_ms += 1e3 * (time.perf_counter() - t0)
        return hits[:k]

    def _rerank(self, snapshot: store.Snapshot, query: ItemFeatures, query_kind: str, rows: np.ndarray) -> np.ndarray:
        """One batched forward pass over the k candidates; the query's features are shared, not copied, and
        rounded to fp16 as stored items are, so that an item scores the same as a query and as a candidate."""
        cand = snapshot.gather(rows, "tok")  # (k, L, T, D) fp16
        if query_kind == "text":
            return self.scorer.logits(cand, query.tok, query.mask)
        return self.scorer.logits(query.tok, cand, snapshot.gather(rows, "mask"))

    def _encode_text(self, text: str) -> ItemFeatures:
        if not text or not text.strip():
            raise QueryError("the query is empty; give some words to search for")
        return self.encoder.encode_texts([text.strip()])

    def _encode_image(self, path: Path) -> ItemFeatures:
        try:
            pixels = self.encoder.load_pixels(path)
        except DecodeError as e:
            raise QueryError(f"cannot use query image {path}: {e}") from None
        return self.encoder.encode_images(pixels[None])

    def _hits(self, snapshot: store.Snapshot, rows: np.ndarray, sims: np.ndarray) -> list[Hit]:
        # row by row: a few values each, and Table.take would import pyarrow.compute (70 ms) into a cold query
        cols = [snapshot.rows.column(name) for name in ("id", "kind", "path", "text")]
        meta = [[c[int(r)].as_py() for c in cols] for r in rows]
        return [Hit(i, kind, float(s), float(s), None, os.fsdecode(path), text)
                for (i, kind, path, text), s in zip(meta, sims)]
