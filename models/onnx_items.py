"""The ONNX item encoder: exported graphs run by ONNX Runtime, with neither torch nor open_clip imported.

An export folder (models/export_cache.py) holds, for one model and its reranker's store encoder:

    text.onnx       ids (B, n), mask (B, n) -> embedding (B, E)[, store (B, Lt, Tt, D), keep (B, Tt)]
    image.onnx      pixels (B, 3, S, S) -> embedding (B, E)[, store (B, Lv, Ti, D)]
    tokenizer.json  CLIP's BPE (models/tokenizer.py)
    encoder.json    the model's identity, its image preparation, the store layout

A session is opened for a tower when it is first used, so a text query never loads the image tower.

For --precision int8 a second folder holds the same graphs with ONNX Runtime's dynamic
quantization applied to their matrix products (int8 weights per output channel, activations
quantized batch by batch as they run), made from the first without torch, once per model.
Everything else (the patch embedding, normalisation, attention's softmax) stays fp32.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from itm.common.errors import DecodeError
from itm.common.options import DEFAULT_MAX_PIXELS

from . import export_cache
from .checkpoint import file_sha256
from .cpu import cpu_flags
from .identity import ModelIdentity
from .images import load_image
from .item_encoder import ItemFeatures, StoreLayout, with_spec_names
from .onnx_session import open_session
from .preprocess import ImagePrep
from .registry import ModelSpec
from .tokenizer import ClipTokenizer

KIND = "encoder"
INT8_KIND = "encoder-int8"
META = "encoder.json"
TOWERS = ("text", "image")


def int8_reduce_range(flags: frozenset[str] | None = None) -> bool:
    """Whether int8 weights keep to 7 bits here: ONNX Runtime's u8 x s8 products on an x86 CPU without VNNI
    (AVX2, AVX-512 without VNNI) add pairs in 16 bits and can saturate with full-range weights: on a Zen 3
    CPU a small random encoder's int8 embeddings fell to cosine 0.982 of fp32's with 8 bits, and passed
    onnx_export.INT8_MIN_COSINE with 7. With VNNI, and off x86, 8 bits. `flags`: the CPU's (`cpu_flags`) by default."""
    words = cpu_flags() if flags is None else flags
    if words is None:  # not Linux: 7 bits, accurate on every CPU
        return True
    return "avx2" in words and not words & {"avx512_vnni", "avx_vnni"}


def int8_key(key: str, reduce_range: bool) -> str:
    """The cache key of an int8 copy: 7-bit and 8-bit weights are different graphs."""
    return key + "-7bit" if reduce_range else key


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
    """Exported graphs behind the ItemEncoder interface (models/item_encoder.py)."""

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

