"""The ONNX item encoder: exported graphs run by ONNX Runtime, with neither torch nor open_clip imported.

An export folder (indexer/export_cache.py) holds, for one model and its reranker's store encoder:

    text.onnx       ids (B, n), mask (B, n) -> embedding (B, E)[, store (B, Lt, Tt, D), keep (B, Tt)]
    image.onnx      pixels (B, 3, S, S) -> embedding (B, E)[, store (B, Lv, Ti, D)]
    tokenizer.json  CLIP's BPE (indexer/tokenizer.py)
    encoder.json    the model's identity, its image preparation, the store layout

A session is opened for a tower when it is first used, so a text query never loads the image tower.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from . import export_cache
from .checkpoint import file_sha256
from .errors import DecodeError
from .images import load_image
from .item_encoder import ItemFeatures, StoreLayout, with_spec_names
from .manifest import ModelIdentity
from .models import ModelSpec
from .onnx_session import open_session
from .options import DEFAULT_MAX_PIXELS
from .preprocess import ImagePrep
from .tokenizer import ClipTokenizer

KIND = "encoder"
META = "encoder.json"


def load(spec: ModelSpec, threads: int, known: ModelIdentity | None = None,
         reranker_sha256: str | None = None, quick_start: bool = False) -> OnnxItemEncoder:
    """The model's export from the cache, made first (with torch) when it is not there yet.

    Raises ExportError when the model cannot be exported (that is remembered beside the cache).
    """
    def export(folder: Path) -> None:
        from .onnx_export import export_encoder  # torch and open_clip, once per model

        export_encoder(spec, folder)

    folder = export_cache.exported(KIND, encoder_key(spec, known, reranker_sha256), export)
    return OnnxItemEncoder(folder, spec, threads, quick_start)


def encoder_key(spec: ModelSpec, known: ModelIdentity | None = None, reranker_sha256: str | None = None) -> str:
    """The cache key of a model's export: its weights (from `known`, else by hashing files) and its reranker's."""
    if known is None:
        arch, pretrained = spec.arch, spec.pretrained
        checkpoint = file_sha256(spec.checkpoint) if spec.checkpoint else None
    else:
        arch, pretrained, checkpoint = known.arch, known.pretrained, known.checkpoint_sha256
    reranker = (reranker_sha256 or file_sha256(spec.reranker)) if spec.reranker else None
    return export_cache.export_key(arch=arch, pretrained=pretrained, checkpoint_sha256=checkpoint,
                                   reranker_sha256=reranker)


class OnnxItemEncoder:
    """Exported graphs behind the ItemEncoder interface (indexer/item_encoder.py)."""

    def __init__(self, folder: Path, spec: ModelSpec, threads: int, quick_start: bool = False):
        self.folder, self.threads, self.quick_start = Path(folder), threads, quick_start
        meta = json.loads((self.folder / META).read_text())
        self.identity = with_spec_names(ModelIdentity(**meta["identity"]), spec)
        store = meta["store"]
        self.store = StoreLayout(store["sha256"], tuple(store["image_shape"]), tuple(store["text_shape"])) \
            if store else None
        self.prep = ImagePrep(**{**meta["prep"], "mean": tuple(meta["prep"]["mean"]),
                                 "std": tuple(meta["prep"]["std"])})
        self._sessions: dict[str, object] = {}
        self._tokenizer: ClipTokenizer | None = None
        self._lock = threading.Lock()

    def load_pixels(self, data: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        try:
            return self.prep(load_image(data, min_side=self.prep.size, max_pixels=max_pixels))
        except DecodeError:
            raise
        except Exception as e:  # one odd file must not stop a build
            raise DecodeError(f"cannot decode ({type(e).__name__}: {e})") from None

    def encode_images(self, pixels: np.ndarray) -> ItemFeatures:
        out = self._run("image", pixels=np.ascontiguousarray(pixels, np.float32))
        return ItemFeatures(out[0], out[1].astype(np.float16) if self.store else None)

    def encode_texts(self, texts: Sequence[str]) -> ItemFeatures:
        ids = self.tokenizer(list(texts))  # (B, L), each row holding its end-of-text token
        eot = (ids == self.tokenizer.eot_id).argmax(1)  # (B,)
        # under the causal mask, positions after the last end of text change nothing the outputs read
        n = int(eot.max()) + 1
        mask = np.arange(n)[None] <= eot[:, None]  # (B, n) SOT..EOT
        out = self._run("text", ids=ids[:, :n], mask=mask)
        if not self.store:
            return ItemFeatures(out[0])
        return ItemFeatures(out[0], out[1].astype(np.float16), out[2])

    @property
    def tokenizer(self) -> ClipTokenizer:
        if self._tokenizer is None:
            self._tokenizer = ClipTokenizer.from_file(self.folder / "tokenizer.json", self.identity.context_length)
        return self._tokenizer

    def open(self, tower: str):
        """The tower's session, opened on first use (most of a cold command's model set-up)."""
        with self._lock:
            if tower not in self._sessions:
                self._sessions[tower] = open_session(self.folder / f"{tower}.onnx", self.threads, self.quick_start)
            return self._sessions[tower]

    def _run(self, tower: str, **inputs: np.ndarray) -> list[np.ndarray]:
        """Run one tower's graph on the inputs it takes (a text graph without a store has no mask)."""
        session = self.open(tower)
        return session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})

