"""Match logits for (image, text) store features, by ONNX Runtime or by torch: one interface for the search.

    >>> scorer = load_fusion(Path("idx/reranker-3f2a9c0d1e4b5a6f.safetensors"), sha256, Runtime())  # loading.py
    >>> scorer.logits(candidates, query_text, query_mask)  # (k,) float32
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from .onnx_session import open_session

KIND = "fusion"


class FusionScorer(Protocol):
    weight: float  # final score = recall cosine + weight * match logit

    def logits(self, image: np.ndarray, text: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """image (B1, Lv, Ti, D) fp16, text (B2, Lt, Tt, D) fp16, mask (B2, Tt) bool -> (max(B1, B2),) float32."""


class OnnxFusion:
    """The reranker's exported forward pass (models/fusion_export.py)."""

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
