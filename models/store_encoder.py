"""The rerank store's encoders: encoder token features pooled and projected to a few bytes per item.

They are the first layers of the fusion reranker (models/fusion.py), run once per item at
build time, so an image costs levels x (1 + regions^2) x d_model fp16 values in the store.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itm.common.errors import CheckpointError

from .checkpoint import file_sha256, load_checkpoint

RERANKER_KIND = "fusion_reranker"
STORE_PREFIX = "store."  # the StoreEncoder's parameters inside a reranker checkpoint


class StoreProjection(nn.Module):
    """LayerNorm + Linear from an encoder's token width to d_model, for one stored level."""

    def __init__(self, width: int, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, d)


class StoreEncoder(nn.Module):
    def __init__(self, n_levels: int, image_width: int, text_width: int, d_model: int,
                 regions: int, max_text_tokens: int):
        super().__init__()
        self.regions, self.max_text_tokens = regions, max_text_tokens
        self.image_store = nn.ModuleList(StoreProjection(image_width, d_model) for _ in range(n_levels))
        self.text_store = nn.ModuleList(StoreProjection(text_width, d_model) for _ in range(n_levels))

    def encode_images(self, tokens: Sequence[Tensor], grid: tuple[int, int]) -> Tensor:
        """One (B, 1+H*W, Wv) tensor per level -> (B, Lv, Ti, D): CLS kept, the H x W grid pooled to regions^2."""
        h, w = grid
        out = []
        for x, p in zip(tokens, self.image_store, strict=True):
            if x.shape[1] != 1 + h * w:
                raise ValueError(f"image tokens {tuple(x.shape)} do not hold CLS + a {h}x{w} grid")
            x = p.norm(x)  # (B, 1+H*W, Wv)
            grid_tokens = x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, Wv, H, W)
            pooled = F.adaptive_avg_pool2d(grid_tokens, self.regions).flatten(2).transpose(1, 2)  # (B, R*R, Wv)
            # pooling before the Linear equals pooling after it (both linear, weights sum to 1), on fewer tokens
            out.append(p.proj(torch.cat([x[:, :1], pooled], 1)))  # (B, Ti, D)
        return torch.stack(out, 1)  # (B, Lv, Ti, D)

    def encode_texts(self, tokens: Sequence[Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        """One (B, L, Wt) tensor per level + mask (B, L) -> (B, Lt, Tt, D), (B, Tt).

        The mask must be a prefix (SOT..EOT real, then padding). A text of n > Tt tokens keeps its
        first Tt-1 tokens and its EOT token (position n-1), which carries the causal text tower's
        summary of the whole text. Padding positions are stored as zeros.
        """
        b, length = mask.shape
        tt = self.max_text_tokens
        n = mask.sum(1)  # (B,) real tokens, SOT..EOT
        pos = torch.arange(tt, device=mask.device)
        idx = pos.expand(b, tt).clone()  # (B, Tt) source position of each stored token
        idx[:, -1] = torch.where(n > tt, n - 1, tt - 1)
        idx = idx.clamp(max=length - 1)  # texts shorter than Tt: the extra positions are padding anyway
        keep = pos[None] < n.clamp(max=tt)[:, None]  # (B, Tt)
        out = []
        for x, p in zip(tokens, self.text_store, strict=True):
            x = x.gather(1, idx[..., None].expand(b, tt, x.shape[-1]))  # (B, Tt, Wt)
            out.append(p.proj(p.norm(x)).masked_fill(~keep[..., None], 0))  # (B, Tt, D)
        return torch.stack(out, 1), keep  # (B, Lt, Tt, D), (B, Tt)


@dataclass(frozen=True)
class LoadedStoreEncoder:
    """A reranker's StoreEncoder loaded on its own, for building the store (numpy in, numpy out)."""

    module: StoreEncoder
    image_layers: tuple[int, ...]
    text_layers: tuple[int, ...]
    sha256: str
    image_shape: tuple[int, int, int]  # (Lv, Ti, D) per image
    text_shape: tuple[int, int, int]  # (Lt, Tt, D) per text

    @torch.inference_mode()
    def images(self, tokens: Sequence[Tensor], grid: tuple[int, int]) -> np.ndarray:
        return self.module.encode_images([t.float() for t in tokens], grid).half().cpu().numpy()

    @torch.inference_mode()
    def texts(self, tokens: Sequence[Tensor], mask: Tensor) -> tuple[np.ndarray, np.ndarray]:
        feats, keep = self.module.encode_texts([t.float() for t in tokens], mask)
        return feats.half().cpu().numpy(), keep.cpu().numpy()


def store_encoder_from_config(cfg: dict) -> StoreEncoder:
    return StoreEncoder(len(cfg["image_layers"]), cfg["image_width"], cfg["text_width"], cfg["d_model"],
                        cfg["regions"], cfg["max_text_tokens"])


def load_store_encoder(path: Path, encoder) -> LoadedStoreEncoder:
    """The store encoder of the reranker checkpoint at `path`, checked against the dual encoder."""
    tensors, meta = load_checkpoint(Path(path), RERANKER_KIND)
    cfg = meta["fusion_config"]
    if (cfg["image_width"], cfg["text_width"]) != (encoder.image_width, encoder.text_width):
        raise CheckpointError(
            f"reranker {path} expects token widths {cfg['image_width']}/{cfg['text_width']}, but the encoder "
            f"has {encoder.image_width}/{encoder.text_width}; train a reranker for this encoder with itm-train")
    module = store_encoder_from_config(cfg)
    own = {k[len(STORE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STORE_PREFIX)}
    try:
        module.load_state_dict(own)
    except RuntimeError as e:
        raise CheckpointError(f"reranker {path} has no usable store encoder: {e}") from None
    ti, tt, n = 1 + cfg["regions"] ** 2, cfg["max_text_tokens"], len(cfg["image_layers"])
    return LoadedStoreEncoder(module.eval(), tuple(cfg["image_layers"]), tuple(cfg["text_layers"]), file_sha256(path),
                          (n, ti, cfg["d_model"]), (n, tt, cfg["d_model"]))
