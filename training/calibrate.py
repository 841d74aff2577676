"""Fitting a reranker's calibration on labelled queries, on the candidates it actually judges.

A probability cut (`itm-search --min-prob`) judges the top candidates that recall hands the
reranker, so the calibration is fitted on exactly those: for each labelled query, the top
`rerank_k` of recall, each labelled true or false by a judge of (query, hit). Two judges exist:
a user's own judgements (JSONL, one line per judged pair: `{"query": ..., "path": ..., "relevant": true}`;
candidates nobody judged are left out of the fit), and the synthetic world's truth checker over a
held-out split (training/heldout.py), which judges every candidate.

    >>> cal, path = calibrate_on_judgements("idx/", "judgements.jsonl")
    >>> cal, path = calibrate_on_world(resolve_model("demo"), "val")
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from itm.common.errors import ItmError
from itm.indexer.manifest import spec_for_index
from itm.models import calibration
from itm.models.calibration import Calibration
from itm.models.registry import ModelSpec
from itm.retrieval.hits import Hit
from itm.retrieval.search import Searcher

from .heldout import HeldOut

Judge = Callable[[str, Hit], "bool | None"]  # (query, image hit) -> relevant? None: not judged, left out


def candidate_pairs(searcher: Searcher, queries: Sequence[str], is_true: Judge,
                    rerank_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(match logits, labels) of the judged ones among the top `rerank_k` recalled images of every text query."""
    if not searcher.has_reranker:
        raise ItmError(f"the index at {searcher.index_dir} has no reranker to calibrate; build it with a model "
                       "that has one")
    logits, labels = [], []
    for q in queries:
        for h in searcher.search(text=q, k=rerank_k, rerank_k=rerank_k):
            label = is_true(q, h)
            if label is not None:
                logits.append(h.match_logit)
                labels.append(bool(label))
    return np.asarray(logits, np.float64), np.asarray(labels, bool)


@dataclass(frozen=True)
class Judgements:
    """A user's relevance judgements: (query, image path) -> relevant, read from JSONL."""

    labels: dict[tuple[str, str], bool]  # (query, real path) -> relevant
    source: Path

    @classmethod
    def read(cls, path: Path | str) -> Judgements:
        """One JSON object a line: query (text), path (an indexed image), relevant (true/false); blank lines skipped.
        Paths are taken relative to the file's folder unless absolute. A bad line raises ItmError naming it."""
        path = Path(path)
        labels: dict[tuple[str, str], bool] = {}
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ItmError(f"cannot read judgements {path}: {e}") from None
        for n, line in enumerate(lines, 1):
            if line.strip():
                query, image, relevant = _judgement(line, f"{path}:{n}")
                labels[(query, os.path.realpath(path.parent / image))] = relevant
        if not labels:
            raise ItmError(f"{path} holds no judgements; write one JSON object a line: "
                           '{"query": "a dog on a beach", "path": "photos/1.jpg", "relevant": true}')
        return cls(labels, path)

    @property
    def queries(self) -> list[str]:
        return sorted({q for q, _ in self.labels})

    def is_true(self, query: str, hit: Hit) -> bool | None:
        return self.labels.get((query, os.path.realpath(hit.path)))


def _judgement(line: str, where: str) -> tuple[str, str, bool]:
    try:
        row = json.loads(line)
        query, image, relevant = row["query"], row["path"], row["relevant"]
    except (ValueError, KeyError, TypeError) as e:
        raise ItmError(f"{where}: not a judgement ({type(e).__name__}: {e}); write "
                       '{"query": TEXT, "path": IMAGE, "relevant": true|false}') from None
    if not isinstance(query, str) or not isinstance(image, str) or not isinstance(relevant, bool):
        raise ItmError(f"{where}: query and path must be strings and relevant true or false")
    return query, image, relevant


def fit_and_save(searcher: Searcher, queries: Sequence[str], judge: Judge, rerank_k: int, method: str,
                 reranker: Path, fitted_on: dict[str, Any]) -> tuple[Calibration, Path]:
    """Fit on the judged candidates of `queries` and write the calibration beside `reranker`."""
    logits, labels = candidate_pairs(searcher, queries, judge, rerank_k)
    if not len(labels) or labels.all() or not labels.any():
        raise ItmError(f"{len(labels)} judged candidates ({int(labels.sum())} relevant): a calibration needs both "
                       f"relevant and irrelevant ones among the top {rerank_k} of each query; judge more of them")
    cal = calibration.fit(logits, labels, searcher.reranker_sha256, method, {**fitted_on, "rerank_k": rerank_k})
    return cal, calibration.save(cal, reranker)


def calibrate_on_judgements(index_dir: Path | str, judgements: Path | str, *, rerank_k: int = 50,
                            method: str = "platt") -> tuple[Calibration, Path]:
    """Fit the calibration of an index's reranker on a user's judgements; saved beside the reranker the index
    was built with (and its copy in the index), where every search of it finds it."""
    judged = Judgements.read(judgements)
    searcher = Searcher(index_dir)
    reranker = _reranker_source(searcher)
    return fit_and_save(searcher, judged.queries, judged.is_true, rerank_k, method, reranker,
                        {"data": f"judgements {judged.source}", "judged": len(judged.labels)})


def calibrate_on_world(spec: ModelSpec, split: str = "val", *, images: int = 300, queries: int = 600, seed: int = 0,
                       rerank_k: int = 50, method: str = "platt") -> tuple[Calibration, Path]:
    """Fit the calibration of `spec`'s reranker on a held-out split of the synthetic world, judged by its truth
    checker; saved beside the reranker."""
    if spec.reranker is None:
        raise ItmError(f"model {spec.name or spec.arch} has no reranker; pass --reranker PATH")
    with tempfile.TemporaryDirectory(prefix="itm-calibrate-") as tmp:
        world = HeldOut.build(split, images, seed, spec, Path(tmp))
        asked = world.query_mix(queries)
        searcher = Searcher(world.index_dir, model=spec)
        data = f"synthetic world, {split} split, seed {seed}, {images} images, {len(asked)} queries"
        return fit_and_save(searcher, asked, world.is_true, rerank_k, method, spec.reranker,
                            {"data": data, "model": spec.name or spec.arch})


def _reranker_source(searcher: Searcher) -> Path:
    """The reranker checkpoint whose sidecar searches of this index read first (retrieval/search.py): the model's
    own (a bundle's), else the one the index was built from."""
    manifest = searcher.snapshot.manifest
    own = spec_for_index(manifest, searcher.index_dir).reranker
    built_from = Path(manifest.reranker.source) if manifest.reranker and manifest.reranker.source else None
    for source in (own, built_from):
        if source is not None and Path(source).is_file():
            return Path(source)
    raise ItmError(f"the reranker the index at {searcher.index_dir} was built with is not at {built_from}; "
                   "calibrate that checkpoint with --model/--reranker instead")
