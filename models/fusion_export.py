"""Exporting the fusion reranker's forward pass to ONNX, checked against torch before use.

The graph takes store features as the index keeps them (fp16) and gives match logits:

    image (B1, Lv, Ti, D) fp16, text (B2, Lt, Tt, D) fp16, mask (B2, Tt) bool -> logits (max(B1, B2),)

with B1 or B2 equal to 1 (a query shared by every candidate). Texts always come at their stored
length Tt: FusionReranker.forward drops the positions after the batch's last real token with a
length read from the data, which a traced graph would keep as a constant, so the graph is traced
at full length; masked positions change no logit, so the logits agree with torch's within float
tolerance (the check below, and tests/retrieval/test_backends.py).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from itm.common.errors import ExportError

from .fusion import FusionReranker
from .fusion_checkpoint import load_reranker

OPSET = 18
TOLERANCE = 1e-3  # largest difference in a match logit allowed in the check
META = "fusion.json"


def export_fusion(reranker: Path, sha256: str, folder: Path) -> None:
    """Write fusion.onnx and fusion.json for the reranker checkpoint at `reranker` into `folder`."""
    model = load_reranker(reranker).float().eval()
    image, text, mask = _example(model, 3, 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
        try:
            torch.onnx.export(model, (image, text, mask), str(folder / "fusion.onnx"),
                              input_names=["image", "text", "mask"], output_names=["logits"],
                              dynamic_axes={"image": {0: "images"}, "text": {0: "texts"}, "mask": {0: "texts"},
                                            "logits": {0: "pairs"}}, opset_version=OPSET, dynamo=False)
        except Exception as e:  # a configuration the exporter cannot handle: the torch backend runs it
            raise ExportError(f"reranker {model.cfg.name}: cannot export ({type(e).__name__}); "
                              "it runs on the torch backend") from None
    cfg = model.cfg
    (folder / META).write_text(json.dumps({"sha256": sha256, "score_weight": cfg.score_weight,
                                           "image_shape": [cfg.n_levels, cfg.image_tokens, cfg.d_model],
                                           "text_shape": [cfg.n_levels, cfg.max_text_tokens, cfg.d_model]}) + "\n")
    _check(folder, model)


def _example(model: FusionReranker, images: int, texts: int, seed: int = 0):
    """Random store features; the masks hold each length from 1 to Tt, the full one included."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(images, cfg.n_levels, cfg.image_tokens, cfg.d_model, generator=g).half()
    text = torch.randn(texts, cfg.n_levels, cfg.max_text_tokens, cfg.d_model, generator=g).half()
    lengths = torch.arange(texts) % cfg.max_text_tokens + 1
    lengths[0] = cfg.max_text_tokens
    mask = torch.arange(cfg.max_text_tokens)[None] < lengths[:, None]
    return image, text.masked_fill(~mask[:, None, :, None], 0), mask


def _check(folder: Path, model: FusionReranker) -> None:
    """The graph against torch in both directions (one text and many images, one image and many texts)."""
    from .fusion_scorer import OnnxFusion

    ours = OnnxFusion(folder, threads=1)
    for images, texts in ((5, 1), (1, 7), (1, 1)):
        image, text, mask = _example(model, images, texts, seed=images * 10 + texts)
        with torch.inference_mode():
            want = model(image, text, mask).float().numpy()
        got = ours.logits(image.numpy(), text.numpy(), mask.numpy())
        if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=TOLERANCE):
            raise ExportError(f"reranker {model.cfg.name}: the exported graph differs from torch; "
                              "it runs on the torch backend")
