"""Item encoders: images and texts in, what the index stores for them out (embeddings, rerank-store features).

A build encodes corpus items with one, and a query is encoded the same way, so an item scores
the same as a query and as a candidate. Two backends give the same arrays within float
tolerance (tests/indexer/test_item_encoder.py):

- "onnx": ONNX Runtime over graphs exported once per model into the per-user cache
  (models/onnx_items.py); once the export is cached, neither torch nor open_clip is imported.
- "torch": open_clip's model itself (models/torch_items.py), for GPUs, bf16 and models whose
  export is not supported.

"auto" (the default) is "onnx" on a CPU in fp32 when the model exports, else "torch". Precision
"int8" is the onnx backend's graphs with their matrix products quantized (onnx_items.py): close
to fp32's arrays, not equal to them, so never chosen unasked.

    >>> enc = load_item_encoder(resolve_model("itm-tiny", "random"))
    >>> enc.encode_texts(["a red circle"]).emb.shape
    (1, 32)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from itm.common.errors import ItmError
from itm.common.options import BACKEND, BACKENDS, DEFAULT_MAX_PIXELS, DEVICE, PRECISION

from .identity import ModelIdentity
from .registry import ModelSpec


def default_threads() -> int:
    """Threads for the model's forward pass: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ItemFeatures:
    """A batch of encoded items, as the index stores them."""

    emb: np.ndarray  # (B, E) float32 unit embeddings
    tok: np.ndarray | None = None  # (B, L, T, D) float16 rerank-store features; None without a reranker
    mask: np.ndarray | None = None  # (B, T) bool: the stored text tokens that are real (texts with a reranker)


@dataclass(frozen=True)
class StoreLayout:
    """The rerank store an encoder writes: whose store encoder, and the fp16 shape stored per item."""

    sha256: str  # of the reranker checkpoint file
    image_shape: tuple[int, int, int]  # (levels, tokens, width) per image
    text_shape: tuple[int, int, int]  # (levels, tokens, width) per text


class ItemEncoder(Protocol):
    identity: ModelIdentity
    store: StoreLayout | None  # None when the model has no reranker

    def load_pixels(self, data: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """An image file's bytes (or path) decoded and prepared: (3, S, S) float32; DecodeError if unusable."""

    def encode_images(self, pixels: np.ndarray) -> ItemFeatures:
        """(B, 3, S, S) prepared pixels -> features."""

    def encode_texts(self, texts: Sequence[str]) -> ItemFeatures:
        """Texts -> features."""

    def open(self, tower: str) -> None:
        """Make the "image" or "text" tower ready now rather than at its first batch."""


@dataclass(frozen=True)
class Runtime:
    """How an item encoder runs."""

    backend: str = BACKEND  # auto | onnx | torch
    device: str = DEVICE  # cpu, cuda, ... (a GPU runs the torch backend)
    precision: str = PRECISION  # fp32 | int8 (the onnx backend) | bf16 | fp16 (the torch backend)
    threads: int | None = None  # threads of the forward pass; None: default_threads()
    quick_start: bool = False  # a short-lived process (one query): start graphs fast rather than run them fast

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ItmError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.threads is not None and self.threads < 1:
            raise ItmError(f"threads must be at least 1, got {self.threads}")

    @property
    def wants_onnx(self) -> bool:
        if self.precision == "int8":
            if self.backend == "torch" or self.device != "cpu":
                where = "--backend torch" if self.backend == "torch" else f"--device {self.device}"
                raise ItmError(f"--precision int8 runs the onnx backend on a CPU; with {where} use fp32 or bf16")
            return True
        plain = self.device == "cpu" and self.precision == "fp32"
        if self.backend == "onnx" and not plain:
            raise ItmError("the onnx backend runs on a CPU in fp32 or int8; use --backend torch for a GPU or bf16")
        return self.backend == "onnx" or (self.backend == "auto" and plain)


def with_spec_names(identity: ModelIdentity, spec: ModelSpec) -> ModelIdentity:
    """The identity of a model loaded through `spec`: the bundle name or checkpoint path the user gave."""
    checkpoint = str(Path(spec.checkpoint).resolve()) if spec.checkpoint and not spec.name else None
    return replace(identity, name=spec.name, checkpoint=checkpoint)
