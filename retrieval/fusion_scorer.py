"""Match logits for (image, text) store features, by ONNX Runtime or by torch: one interface for the search.

    >>> scorer = load_fusion(Path("idx/reranker-3f2a9c0d1e4b5a6f.safetensors"), sha256, Runtime())
    >>> scorer.logits(candidates, query_text, query_mask)  # (k,) float32
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from indexer import export_cache
from indexer.checkpoint import file_sha256
from indexer.errors import ExportError
from indexer.item_encoder import Runtime, default_threads
from indexer.onnx_session import open_session

KIND = "fusion"


class FusionScorer(Protocol):
    weight: float  # final score = recall cosine + weight * match logit

    def logits(self, image: np.ndarray, text: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """image (B1, Lv, Ti, D) fp16, text (B2, Lt, Tt, D) fp16, mask (B2, Tt) bool -> (max(B1, B2),) float32."""


class OnnxFusion:
    """The reranker's exported forward pass (retrieval/fusion_export.py)."""

    def __init__(self, folder: Path, threads: int, quick_start: bool = False):
        meta = json.loads((Path(folder) / "fusion.json").read_text())
        self.weight = float(meta["score_weight"])
        self.session = open_session(Path(folder) / "fusion.onnx", threads, quick_start)

    def logits(self, image: np.ndarray, text: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"image": np.ascontiguousarray(image, np.float16), "text": np.ascontiguousarray(text, np.float16),
                "mask": np.ascontiguousarray(mask, bool)}
        return self.session.run(None, feed)[0].astype(np.float32)


class TorchFusion:
    """The reranker itself (a FusionReranker in eval mode)."""

    def __init__(self, model):
        self.model = model
        self.weight = float(model.cfg.score_weight)

    def logits(self, image: np.ndarray, text: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        device = next(self.model.parameters()).device  # the store's features come from memory: moved to a GPU
        with torch.inference_mode():
            out = self.model(*(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (image, text, mask)))
        return out.float().cpu().numpy()


def load_fusion(reranker: Path, sha256: str, runtime: Runtime = Runtime()) -> FusionScorer:
    """The scorer of the reranker checkpoint at `reranker` (whose file hash is `sha256`).

    The export is keyed by the weights' hash and by the checkpoint's JSON (its config, the score
    weight among it): a weight changed beside the same weights file is a new export, not a stale one.
    """
    if runtime.wants_onnx:
        config = reranker.with_suffix(".json")
        key = export_cache.export_key(reranker_sha256=sha256,
                                      config_sha256=file_sha256(config) if config.is_file() else None)
        try:
            folder = export_cache.exported(KIND, key, lambda folder: _export(reranker, sha256, folder))
            return OnnxFusion(folder, runtime.threads or default_threads(), runtime.quick_start)
        except ExportError:
            if runtime.backend == "onnx":
                raise
    from .checkpoint import load_reranker

    return TorchFusion(load_reranker(reranker, runtime.device).eval())


def _export(reranker: Path, sha256: str, folder: Path) -> None:
    from .fusion_export import export_fusion  # torch, once per reranker

    export_fusion(reranker, sha256, folder)
