"""The dual encoder: an open_clip image tower and text tower behind one small interface."""
from __future__ import annotations

import functools
import logging
import platform
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from PIL import Image

from itm.common.errors import CheckpointError, DecodeError, ItmError, ItmWarning

from .checkpoint import file_sha256, load_checkpoint, save_checkpoint
from .cpu import cpu_flags
from .identity import ModelIdentity
from .images import DEFAULT_MAX_PIXELS, load_image
from .registry import RANDOM, ModelSpec, open_clip_registry
from .weights import pretrained_source

open_clip_registry()  # itm's architectures by name

ENCODER_KIND = "dual_encoder"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Encoded:
    embeddings: torch.Tensor  # (B, E) float32, L2-normalised
    tokens: list[torch.Tensor]  # one per requested layer: image (B, 1+H*W, W) with CLS first; text (B, L, W)
    mask: torch.Tensor | None = None  # (B, L) bool, True for real text tokens (SOT..EOT)
    grid: tuple[int, int] | None = None  # (H, W) patch grid of image tokens


class DualEncoder:
    """Embeds images and texts into one space; optionally returns token features of chosen layers.

    >>> enc = DualEncoder.load(resolve_model("itm-tiny", "random"))
    >>> enc.encode_texts(["a red circle"]).embeddings.shape
    torch.Size([1, 32])
    """

    def __init__(self, model: open_clip.CLIP, tokenizer, preprocess, spec: ModelSpec, identity: ModelIdentity,
                 device: str = "cpu", precision: str = "fp32"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess  # PIL.Image -> (3, S, S) float tensor
        self.spec = spec
        self.identity = identity  # what the index manifest records and checks
        self.device = torch.device(device)
        self.dtype = PRECISIONS[precision]
        self.eot_id = eot_token_id(tokenizer)
        self.pad_id = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None)

    @classmethod
    def load(cls, spec: ModelSpec, device: str = "cpu", precision: str = "fp32") -> "DualEncoder":
        if precision not in PRECISIONS:
            raise ItmError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision == "fp16" and not str(device).startswith("cuda"):
            raise ItmError("fp16 needs a GPU (--device cuda); on a CPU use --precision bf16 or fp32")
        if precision == "bf16" and bf16_is_emulated(device):
            warnings.warn("this CPU has no native bf16 arithmetic (AVX-512 BF16 or AMX), so bf16 runs 5-12x "
                          "slower than fp32 here; use --precision fp32", ItmWarning, stacklevel=2)
        model, model_cfg, sha = _build_model(spec)
        identity = ModelIdentity(
            arch=spec.arch, pretrained=spec.pretrained, checkpoint_sha256=sha, embed_dim=int(model_cfg["embed_dim"]),
            image_size=int(model.visual.image_size[0]), context_length=int(model.context_length), name=spec.name,
            checkpoint=str(Path(spec.checkpoint).resolve()) if spec.checkpoint and not spec.name else None)
        tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length) \
            if "hf_tokenizer_name" not in model_cfg.get("text_cfg", {}) else open_clip.get_tokenizer(spec.arch)
        pp = open_clip.get_model_preprocess_cfg(model) if hasattr(open_clip, "get_model_preprocess_cfg") else {}
        preprocess = open_clip.image_transform(
            model.visual.image_size, is_train=False, mean=pp.get("mean"), std=pp.get("std"),
            resize_mode=pp.get("resize_mode"), interpolation=pp.get("interpolation"))
        model = model.to(device=device, dtype=PRECISIONS[precision])
        return cls(model, tokenizer, preprocess, spec, identity, device, precision)

    @property
    def _causal_argmax_text(self) -> bool:
        m = self.model
        return (getattr(m, "text_pool_type", None) == "argmax" and getattr(m, "attn_mask", None) is not None
                and hasattr(m, "token_embedding"))

    @property
    def embed_dim(self) -> int:
        return self.identity.embed_dim

    @property
    def image_size(self) -> int:
        return self.identity.image_size

    @property
    def n_image_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def n_text_layers(self) -> int:
        return len(self.model.transformer.resblocks)

    @property
    def image_width(self) -> int:
        return int(self.model.visual.transformer.width)

    @property
    def text_width(self) -> int:
        return int(self.model.transformer.width)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)  # (3, S, S)

    def load_pixels(self, data: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """An image file's bytes (or its path) decoded and prepared for encode_images: (3, S, S).

        The one way in for corpus, training, evaluation and query images. Anything unusable,
        a decoder's or a transform's own bug on one file included, raises DecodeError with a
        short reason.
        """
        try:
            return self.preprocess(load_image(data, min_side=self.image_size, max_pixels=max_pixels))
        except DecodeError:
            raise
        except Exception as e:  # one odd file must not stop a build, a training run or an evaluation
            raise DecodeError(f"cannot decode ({type(e).__name__}: {e})") from None

    def encode_images(self, pixels: torch.Tensor, layers: Sequence[int] = (), grad: bool = False) -> Encoded:
        """Unit embeddings, plus token features of `layers`; `grad` keeps the graph for training."""
        with torch.inference_mode(not grad), torch.set_grad_enabled(grad):
            return self._images(pixels.to(self.device, self.dtype), layers)

    def _images(self, pixels: torch.Tensor, layers: Sequence[int]) -> Encoded:
        if not layers:  # pixels (B, 3, S, S)
            return Encoded(_unit(self.model.encode_image(pixels)), [])
        out = self.model.forward_intermediates(
            image=pixels, image_indices=_absolute(layers, self.n_image_layers), image_output_extra_tokens=True)
        tokens = []
        for grid, prefix in zip(out["image_intermediates"], out["image_intermediates_prefix"]):
            b, w, h, gw = grid.shape  # (B, W, H, Gw)
            tokens.append(torch.cat([prefix, grid.flatten(2).transpose(1, 2)], 1).float())  # (B, 1+H*Gw, W)
        return Encoded(_unit(out["image_features"]), tokens, grid=(h, gw))

    def encode_texts(self, texts: Sequence[str], layers: Sequence[int] = (), grad: bool = False) -> Encoded:
        with torch.inference_mode(not grad), torch.set_grad_enabled(grad):
            return self._texts(texts, layers)

    def _texts(self, texts: Sequence[str], layers: Sequence[int]) -> Encoded:
        ids = self.tokenizer(list(texts)).to(self.device)  # (B, L)
        eot = end_of_text(ids, self.eot_id, self.pad_id)  # (B,)
        mask = torch.arange(ids.shape[1], device=ids.device)[None] <= eot[:, None]  # (B, L)
        if self._causal_argmax_text:
            # positions after the last EOT cannot change anything before it under a causal mask, and the
            # pooled feature is read at EOT: cutting them gives the same result for a fraction of the work
            n = int(eot.max()) + 1
            pooled, tokens = self._text_tower(ids[:, :n], _absolute(layers, self.n_text_layers))
            return Encoded(_unit(pooled), [t.float() for t in tokens], mask=mask[:, :n])
        if not layers:
            return Encoded(_unit(self.model.encode_text(ids)), [], mask=mask)
        out = self.model.forward_intermediates(text=ids, text_indices=_absolute(layers, self.n_text_layers))
        return Encoded(_unit(out["text_features"]), [t.float() for t in out["text_intermediates"]], mask=mask)

    def _text_tower(self, ids: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """open_clip's text forward on a sequence shorter than the context: (B, E) pooled, layer tokens."""
        m = self.model
        n = ids.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(ids).to(cast) + m.positional_embedding[:n].to(cast)  # (B, n, W)
        x, tokens = m.transformer.forward_intermediates(x, attn_mask=m.attn_mask[:n, :n], indices=layers or None)
        x = text_global_pool(m.ln_final(x), ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if isinstance(m.text_projection, torch.nn.Linear):
            x = m.text_projection(x)
        elif m.text_projection is not None:
            x = x @ m.text_projection
        return x, tokens if layers else []

    def save(self, path: Path) -> Path:
        """Write this encoder as an itm checkpoint (safetensors + JSON) that `--checkpoint` loads."""
        return save_encoder(self.model, self.spec.arch, path)


def bf16_is_emulated(device: str | torch.device) -> bool:
    """Whether bf16 on `device` would be emulated in software (a CPU without native bf16), so slower than fp32."""
    return not str(device).startswith("cuda") and not cpu_has_native_bf16()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively; without it torch emulates bf16, several times slower than fp32."""
    words = cpu_flags()
    if words is None:  # not Linux: ask oneDNN
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in words  # Armv8.6 BF16 extension, in /proc/cpuinfo's Features
    return bool(words & {"avx512_bf16", "amx_bf16"})


def eot_token_id(tokenizer) -> int | None:
    """The end-of-text id of an open_clip tokenizer.

    SimpleTokenizer names it (and it is its largest id). The Hugging Face wrappers (HFTokenizer,
    SigLipTokenizer) hold a transformers tokenizer: its eos token, or sep for BERT vocabularies,
    which have no eos. Neither need be the largest id of the vocabulary.
    """
    if getattr(tokenizer, "eot_token_id", None) is not None:
        return int(tokenizer.eot_token_id)
    inner = getattr(tokenizer, "tokenizer", None)
    for name in ("eos_token_id", "sep_token_id"):
        if getattr(inner, name, None) is not None:
            return int(getattr(inner, name))
    return None


def end_of_text(ids: torch.Tensor, eot_id: int | None, pad_id: int | None = None) -> torch.Tensor:
    """(B,) position of each row's end-of-text token in (B, L) ids.

    Its first occurrence: SigLIP's T5 vocabulary pads with its end-of-text id, and HFTokenizer's
    "clips" mode puts a class token after the padding. A row without one (HFTokenizer with
    strip_sep_token) ends at its last token that is not padding.
    """
    last = ids.shape[1] - 1
    real = ids != pad_id if pad_id is not None else torch.ones_like(ids, dtype=torch.bool)
    fallback = last - real.flip(1).int().argmax(1)  # (B,) last non-padding position
    if eot_id is None:
        return fallback
    hit = ids == eot_id  # (B, L)
    return torch.where(hit.any(1), hit.int().argmax(1), fallback)


def save_encoder(model: open_clip.CLIP, arch: str, path: Path) -> Path:
    """Write an open_clip model of an itm-registered architecture as an itm checkpoint."""
    cfg = open_clip.get_model_config(arch)
    return save_checkpoint({k: v.float() for k, v in model.state_dict().items()},
                           {"kind": ENCODER_KIND, "arch": arch, "model_cfg": cfg}, path)


def _build_model(spec: ModelSpec) -> tuple[open_clip.CLIP, dict[str, Any], str | None]:
    if spec.checkpoint is not None and Path(spec.checkpoint).suffix == ".safetensors" \
            and Path(spec.checkpoint).with_suffix(".json").is_file():
        tensors, meta = load_checkpoint(spec.checkpoint, ENCODER_KIND)
        if meta["arch"] != spec.arch and spec.name is None:
            raise CheckpointError(f"checkpoint {spec.checkpoint} holds a {meta['arch']} model, not {spec.arch}")
        model = open_clip.CLIP(**meta["model_cfg"])
        try:
            model.load_state_dict(tensors)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {spec.checkpoint} does not fit {meta['arch']}: {e}") from None
        return model, meta["model_cfg"], file_sha256(spec.checkpoint)
    cfg = open_clip.get_model_config(spec.arch)
    if spec.checkpoint is not None:
        if not Path(spec.checkpoint).is_file():
            raise CheckpointError(f"checkpoint {spec.checkpoint} not found")
        try:  # open_clip's own loader, with torch.load(weights_only=True) for pickle-format files
            model = open_clip.create_model(spec.arch, pretrained=str(spec.checkpoint), weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot load {spec.checkpoint} as {spec.arch}: {e}") from None
        return model, cfg, file_sha256(spec.checkpoint)
    if spec.pretrained == RANDOM:
        with torch.random.fork_rng(), _quiet_root_logger():
            torch.manual_seed(0)  # the same random model every time, so build and search agree
            return open_clip.create_model(spec.arch), cfg, None
    source = pretrained_source(spec.arch, spec.pretrained)
    return open_clip.create_model(spec.arch, pretrained=source), cfg, None


@contextmanager
def _quiet_root_logger():
    """open_clip warns on the root logger that random weights are random; here that is the request."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _absolute(layers: Sequence[int], n: int) -> list[int]:
    out = [i % n for i in layers]
    if any(not -n <= i < n for i in layers):
        raise ItmError(f"layer indices {list(layers)} out of range for a {n}-layer tower")
    return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)
