"""Two-stage search: FAISS recall of the top-k, then fusion reranking of those k.

A query is encoded by the index's own item encoder (models/item_encoder.py), as a corpus item
is, and reranked by its fusion scorer (models/fusion_scorer.py); on a CPU both run exported
graphs by default, so a query from the shell imports neither torch nor open_clip.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from itm.common.errors import DecodeError, EmptyIndexError, ModelMismatchError, QueryError
from itm.common.options import DEVICE, PRECISION
from itm.common.paths import default_index_dir
from itm.indexer import store
from itm.indexer.ann import to_gpu_if_available
from itm.indexer.manifest import check_model, check_reranker, read_manifest, spec_for_index
from itm.models import calibration
from itm.models.fusion_scorer import FusionScorer
from itm.models.item_encoder import ItemFeatures, Runtime
from itm.models.loading import load_fusion, load_item_encoder
from itm.models.registry import ModelSpec

from .filtering import RowColumns
from .hits import Hit  # the result type, torch-free for retrieval/client.py
from .query import Filters, Part, Query, Refine
from .rerank import rerank_top

EXACT_FILTERED = 20_000  # a filter that passes at most this many rows of a kind scores them all exactly
DEDUP_DEPTH = 4  # with --dedup, candidates recalled per result asked for
NO_PROBABILITY = ("--min-prob needs the index's fusion reranker: a recall cosine is not a probability of match "
                  "(build the index with a model that has a reranker, e.g. --model demo, and leave out --no-rerank)")


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

    def columns(self) -> RowColumns:
        """What filters and date sorting read, computed on the first query that needs it."""
        return _columns(self.snapshot)


@functools.lru_cache(maxsize=2)  # the generation served, and the one before it while queries finish on it
def _columns(snapshot: store.Snapshot) -> RowColumns:
    return RowColumns(snapshot.rows)


class Searcher:
    """Answers queries against one committed generation of an index; `refresh` moves to the latest.

    >>> s = Searcher("idx/")
    >>> [h.path for h in s.search(text="a red circle left of a blue square", k=3)]
    ['/photos/0007.png', '/photos/0131.png', '/photos/0042.png']
    """

    def __init__(self, index_dir: Path | str | None = None, *, model: ModelSpec | None = None,
                 rerank: bool = True, device: str = DEVICE, precision: str = PRECISION, backend: str = "auto",
                 threads: int | None = None, quick_start: bool = False):
        """quick_start: for a process that answers one query (Runtime.quick_start)."""
        self.index_dir = Path(index_dir) if index_dir else default_index_dir()
        snapshot = store.Snapshot.open(self.index_dir)
        manifest = snapshot.manifest
        if not sum(manifest.counts.values()):
            raise EmptyIndexError(f"index at {self.index_dir} is empty; add images with `itm-index build FOLDER`")
        runtime = Runtime(backend, device, precision, threads, quick_start)
        self._reranker_sha = manifest.reranker.sha256 if manifest.reranker else None
        reranker = self.index_dir / manifest.reranker.file if manifest.reranker else None
        base = model or spec_for_index(manifest, self.index_dir)
        # queries get the index's store encoder, so that they are encoded as its items were
        spec = dataclasses.replace(base, reranker=reranker)
        self.encoder = load_item_encoder(spec, runtime, None if model else manifest.model, self._reranker_sha)
        check_model(manifest, self.encoder.identity, self.index_dir)
        self.scorer = load_fusion(reranker, self._reranker_sha, runtime) if rerank and reranker else None
        # the calibration fitted for this reranker: beside the model's own checkpoint (a bundle's), else beside
        # the one the index was built from (models/calibration.py)
        sources = [base.reranker, manifest.reranker.source if manifest.reranker else None]
        self.calibration = calibration.load(sources, self._reranker_sha) if self.scorer else calibration.UNCALIBRATED
        self._gen = _Generation.of(snapshot, self.encoder.identity.embed_dim)
        self.timings = Timings()

    @property
    def snapshot(self) -> store.Snapshot:
        return self._gen.snapshot

    @property
    def has_reranker(self) -> bool:
        return self.scorer is not None

    @property
    def reranker_sha256(self) -> str | None:
        """The sha256 of the index's reranker checkpoint (what a calibration is fitted for)."""
        return self._reranker_sha

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

    def search(self, text: str | None = None, image: Path | str | None = None, **fields: Any) -> list[Hit]:
        """Text -> images (default kind "image"), or image -> texts and images (default kind "all"):
        `self.run(Query(text, image, **fields))`, the fields as retrieval/query.py's Query names them.

        >>> s.search("a red circle", k=5, parts=[Part(-1.0, text="a square")], filters=Filters(path="*/2024/*"),
        ...          refine=Refine(min_prob=0.5, sort="date"))
        """
        return self.run(Query(text, str(image) if image is not None else None, **fields))

    def run(self, query: Query) -> list[Hit]:
        """The hits of `query`: its parts encoded and combined, recalled, reranked, cut and sorted.

        `parts` add weighted texts and images (the README says how each stage uses them); `filters` restrict
        what may be returned before ranking, so that k matching hits come back when k exist; `refine` cuts by
        probability of match, removes near-duplicates, and sorts; `rerank=False` answers by recall alone.
        Images are files here (a server writes uploads to files first); indexed images are named by row id or path.
        """
        query = query.checked()
        refine, filters, gen = query.refine, query.filters, self._gen  # one generation for the whole query
        if query.text is not None:
            main = [Part(1.0, text=query.text)]
        elif any(x is not None for x in (query.image, query.image_id, query.image_path)):
            main = [Part(1.0, image=self._image_file(gen, query.image, query.image_id, query.image_path))]
        else:
            main = []  # parts alone
        parts = main + [p if p.text is not None else Part(p.weight, image=self._image_file(gen, p.image, p.image_id))
                        for p in query.parts]
        if not any(p.weight > 0 for p in parts):
            raise QueryError("a query needs at least one part with a positive weight")
        query_kind = "text" if next(p for p in parts if p.weight > 0).text is not None else "image"
        scorer = self.scorer if query.rerank else None
        if refine.min_prob is not None and scorer is None:
            raise QueryError(NO_PROBABILITY)
        kind = query.kind or ("image" if query_kind == "text" else "text" if refine.min_prob is not None else "all")
        t0 = time.perf_counter()
        encoded = self._encode_parts(parts)
        emb = combine([p.weight for p, _ in encoded], np.concatenate([f.emb for _, f in encoded]))
        self.timings = Timings(encode_ms=1e3 * (time.perf_counter() - t0))
        hits: list[Hit] = []
        for target in (("text", "image") if kind == "all" else (kind,)):
            hits += self._search_kind(gen, emb, encoded, target, query.k, query.rerank_k, filters, refine, scorer)
        return hits

    @staticmethod
    def _image_file(gen: _Generation, image: str | bytes | None, image_id: int | None = None,
                    image_path: str | None = None) -> str:
        """A query image as the file the encoder reads: the one given, or an indexed image's."""
        if isinstance(image, bytes):
            raise QueryError("an uploaded image reaches the search as a file (SearchService writes it to one)")
        if image is not None:
            return image
        from .gallery import find_image, find_image_by_path  # pyarrow.compute: only for a query by an indexed image

        found = find_image(gen.snapshot, image_id) if image_id is not None else \
            find_image_by_path(gen.snapshot, image_path)
        return str(found.path)

    def unmigrated(self) -> int:
        """Images of the generation read without metadata (indexed by format 2, not yet migrated by a build)."""
        return self._gen.columns().unmigrated

    def _search_kind(self, gen: _Generation, emb: np.ndarray, encoded: list[tuple[Part, ItemFeatures]], target: str,
                     k: int, rerank_k: int, filters: Filters, refine: Refine,
                     scorer: FusionScorer | None) -> list[Hit]:
        if target not in gen.ann:
            return []
        judges = [(p.weight, f) for p, f in encoded if (p.text is not None) == (target == "image")]  # other modality
        rerank = scorer is not None and any(w > 0 for w, _ in judges)
        if refine.min_prob is not None and not rerank:
            raise QueryError(f"--min-prob judges {target} results against the query's "
                             f"{'texts' if target == 'image' else 'images'}, and it has none with a positive weight; "
                             f"pass --kind {'text' if target == 'image' else 'image'}")
        depth = max(k, rerank_k) if rerank else k
        if refine.dedup is not None:
            depth = max(depth, DEDUP_DEPTH * k)  # room for k distinct results among the candidates
        t0 = time.perf_counter()
        rows, sims = self._recall(gen, emb, target, depth, filters)
        self.timings.recall_ms += 1e3 * (time.perf_counter() - t0)
        hits = self._hits(gen.snapshot, rows, sims)
        if rerank and len(rows):
            t0 = time.perf_counter()
            # only the top rerank_k are rescored (the rest keep recall order); all of them when cut by probability
            n = len(rows) if refine.min_prob is not None else min(rerank_k, len(rows))
            logit, penalty, prob = self._judge(scorer, gen.snapshot, judges, target, rows[:n])
            scores = sims[:n] + scorer.weight * (logit - penalty)  # recall + weight x logit, as BLIP combines them
            hits = [dataclasses.replace(h, score=float(s), match_logit=float(g), probability=float(p))
                    for h, s, g, p in zip(hits, scores, logit, prob)] + hits[n:]
            order = rerank_top(np.arange(len(hits)), scores)
            hits, rows = [hits[i] for i in order], rows[order]
            self.timings.rerank_ms += 1e3 * (time.perf_counter() - t0)
        if refine.min_prob is not None:
            keep = np.asarray([h.probability >= refine.min_prob for h in hits], bool)
            hits, rows = [h for h, y in zip(hits, keep) if y], rows[keep] if len(rows) else rows
        if refine.dedup is not None:
            hits, rows = self._dedup(gen.snapshot, hits, rows, refine.dedup, k)
        return sort_hits(hits[:k], rows[:k], refine.sort, gen)

    def _recall(self, gen: _Generation, emb: np.ndarray, target: str, depth: int,
                filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        """The top `depth` rows of `target` that pass `filters`, by cosine, and their cosines.

        When few rows pass, they are scored exactly; else the ANN index is asked for deeper and deeper
        candidates until `depth` of them pass, or it has given all it holds.
        """
        index, kind_rows = gen.ann[target], gen.kind_rows[target]
        if not filters.active:
            sims, pos = index.search(emb, min(depth, index.ntotal))
            keep = pos[0] >= 0
            return kind_rows[pos[0][keep]], sims[0][keep]
        allowed = gen.columns().mask(filters)[kind_rows]  # (n,) in the order the ANN index holds them
        passing = int(allowed.sum())
        if passing <= EXACT_FILTERED:
            rows = kind_rows[allowed]
            sims = gen.snapshot.gather(rows, "emb") @ emb[0] if passing else np.zeros(0, np.float32)
            order = np.argsort(-sims, kind="stable")[:depth]
            return rows[order], sims[order].astype(np.float32)
        ask = min(index.ntotal, max(depth, 2 * depth * len(kind_rows) // passing))
        while True:
            sims, pos = index.search(emb, ask)
            found = pos[0] >= 0
            found[found] = allowed[pos[0][found]]
            if found.sum() >= depth or ask >= index.ntotal:
                return kind_rows[pos[0][found]][:depth], sims[0][found][:depth]
            ask = min(index.ntotal, 4 * ask)

    def _judge(self, scorer: FusionScorer, snapshot: store.Snapshot, judges: list[tuple[float, ItemFeatures]], target: str,
               rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fusion model's verdict on candidates `rows` against the query's parts of the other modality,
        one batched forward pass per part: the weighted mean logit of the positive parts, the penalty from
        the negative ones, and the calibrated probability of matching the positive parts and none of the
        negative ones (taken as independent)."""
        cand = snapshot.gather(rows, "tok")  # (k, L, T, D) fp16
        cand_mask = snapshot.gather(rows, "mask") if target == "text" else None
        total = sum(w for w, _ in judges if w > 0)
        logit, penalty, miss = np.zeros(len(rows), np.float32), np.zeros(len(rows), np.float32), np.ones(len(rows))
        for w, f in judges:
            part = scorer.logits(cand, f.tok, f.mask) if target == "image" else \
                scorer.logits(f.tok, cand, cand_mask)
            if w > 0:
                logit += (w / total) * part
            else:  # pushes down the candidates the reranker believes match what the query excludes
                penalty += (-w / total) * np.maximum(part, 0.0)
                miss *= 1.0 - self.calibration.probability(part)
        return logit, penalty, self.calibration.probability(logit) * miss

    def _dedup(self, snapshot: store.Snapshot, hits: list[Hit], rows: np.ndarray, threshold: float,
               k: int) -> tuple[list[Hit], np.ndarray]:
        """Each hit in rank order is kept unless its embedding's cosine with a kept one reaches `threshold`;
        then the most similar kept hit counts it as hidden. Stops once k are kept."""
        if not hits:
            return hits, rows
        emb = snapshot.gather(rows, "emb")  # (n, E) unit vectors
        kept: list[int] = []
        hidden = [0] * len(hits)
        for i in range(len(hits)):
            sims = emb[kept] @ emb[i] if kept else np.zeros(0)
            if len(sims) and sims.max() >= threshold:
                hidden[kept[int(np.argmax(sims))]] += 1
            elif len(kept) == k:
                break
            else:
                kept.append(i)
        return [dataclasses.replace(hits[i], duplicates=hidden[i]) for i in kept], rows[kept]

    def _encode_parts(self, parts: list[Part]) -> list[tuple[Part, ItemFeatures]]:
        """Each part's features: the texts in one batch, the images one by one."""
        texts = [i for i, p in enumerate(parts) if p.text is not None]
        if any(not parts[i].text.strip() for i in texts):
            raise QueryError("the query is empty; give some words to search for")
        feats: dict[int, ItemFeatures] = {}
        if texts:
            batch = self.encoder.encode_texts([parts[i].text.strip() for i in texts])
            feats = {i: _row(batch, j) for j, i in enumerate(texts)}
        for i, p in enumerate(parts):
            if p.image is not None:
                feats[i] = self._encode_image(Path(p.image))
        return [(p, feats[i]) for i, p in enumerate(parts)]

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


def combine(weights: list[float], embs: np.ndarray) -> np.ndarray:
    """The query's recall vector: the weighted sum of its parts' unit embeddings (n, E), made unit again. (1, E)"""
    v = np.asarray(weights, np.float32) @ np.asarray(embs, np.float32)
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        raise QueryError("the weighted parts of the query cancel out; change their weights")
    return (v / norm)[None].astype(np.float32)


def sort_hits(hits: list[Hit], rows: np.ndarray, by: str, gen: _Generation) -> list[Hit]:
    """Hits as ranked ("score"), by date newest first ("date"), or by path, then text ("path")."""
    if by == "date" and hits:
        dates = gen.columns().dates[rows]
        order = sorted(range(len(hits)), key=lambda i: dates[i], reverse=True)  # stable: rank breaks ties
        return [hits[i] for i in order]
    if by == "path":
        return sorted(hits, key=lambda h: (os.fsencode(h.path), h.text or ""))
    return hits


def _row(feats: ItemFeatures, i: int) -> ItemFeatures:
    pick = lambda a: None if a is None else a[i:i + 1]  # noqa: E731
    return ItemFeatures(feats.emb[i:i + 1], pick(feats.tok), pick(feats.mask))
