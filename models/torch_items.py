"""The torch item encoder: open_clip's dual encoder and the reranker's store encoder, numpy in and out."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from itm.common.options import DEFAULT_MAX_PIXELS, DEVICE, PRECISION

from .encoder import DualEncoder
from .item_encoder import ItemFeatures, StoreLayout
from .registry import ModelSpec
from .store_encoder import LoadedStoreEncoder, load_store_encoder


class TorchItemEncoder:
    """DualEncoder + LoadedStoreEncoder behind the ItemEncoder interface (models/item_encoder.py)."""

    def __init__(self, dual: DualEncoder, store_encoder: LoadedStoreEncoder | None):
        self.dual, self.store_encoder = dual, store_encoder
        self.identity = dual.identity
        self.store = StoreLayout(store_encoder.sha256, store_encoder.image_shape, store_encoder.text_shape) \
            if store_encoder else None

    @classmethod
    def load(cls, spec: ModelSpec, device: str = DEVICE, precision: str = PRECISION,
             threads: int | None = None) -> TorchItemEncoder:
        if threads is not None:
            torch.set_num_threads(threads)
        dual = DualEncoder.load(spec, device, precision)
        store = load_store_encoder(spec.reranker, dual) if spec.reranker else None
        if store is not None:
            store.module.to(dual.device)  # beside the towers whose tokens it projects (a GPU's, with --device cuda)
        return cls(dual, store)

    def open(self, tower: str) -> None:
        """Both towers are ready once loaded."""

    def load_pixels(self, data: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        return self.dual.load_pixels(data, max_pixels).numpy()

    def encode_images(self, pixels: np.ndarray) -> ItemFeatures:
        layers = self.store_encoder.image_layers if self.store_encoder else ()
        out = self.dual.encode_images(torch.from_numpy(np.ascontiguousarray(pixels)), layers)
        tok = self.store_encoder.images(out.tokens, out.grid) if self.store_encoder else None
        return ItemFeatures(out.embeddings.float().cpu().numpy(), tok)  # float32 also from fp16 towers

    def encode_texts(self, texts: Sequence[str]) -> ItemFeatures:
        layers = self.store_encoder.text_layers if self.store_encoder else ()
        out = self.dual.encode_texts(list(texts), layers)
        tok, mask = self.store_encoder.texts(out.tokens, out.mask) if self.store_encoder else (None, None)
        return ItemFeatures(out.embeddings.float().cpu().numpy(), tok, mask)
