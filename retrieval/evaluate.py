"""Recall@K in both directions, recall-only and two-stage, by the standard protocol.

Text -> image: each caption is a query; it is answered when its own image is within the top K.
Image -> text: each image is a query; it is answered when any of its captions is within the top K.
RSUM adds the six recalls (R@1/5/10, both directions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from indexer.encoder import DualEncoder
from indexer.errors import DecodeError, ItmError
from indexer.images import load_image
from indexer.pipeline import ordered_map

from .data import ImageCaptions
from .fusion import FusionReranker

KS = (1, 5, 10)
PAIR_CHUNK = 2048  # fusion pairs per forward pass


@dataclass
class Features:
    """Everything evaluation needs about a dataset, computed once."""

    image_emb: torch.Tensor  # (Ni, E)
    text_emb: torch.Tensor  # (Nt, E)
    caption_image: np.ndarray  # (Nt,) index of each caption's image
    texts: list[str]
    image_store: torch.Tensor | None = None  # (Ni, Lv, Ti, D) fp16, with a reranker
    text_store: torch.Tensor | None = None  # (Nt, Lt, Tt, D) fp16
    text_mask: torch.Tensor | None = None  # (Nt, Tt)


@dataclass(frozen=True)
class Ranks:
    t2i: np.ndarray  # (Nt,) 0-based rank of each caption's image
    i2t: np.ndarray  # (Ni,) 0-based best rank among each image's captions


def embed_dataset(encoder: DualEncoder, reranker: FusionReranker | None, data: Sequence[ImageCaptions],
                  batch_size: int = 128, workers: int = 2) -> Features:
    def load(item: ImageCaptions) -> torch.Tensor:
        try:
            return encoder.prepare(load_image(item.image, min_side=encoder.image_size))
        except DecodeError as e:
            raise ItmError(f"evaluation image {item.image}: {e}") from None

    ilayers = reranker.cfg.image_layers if reranker is not None else ()
    tlayers = reranker.cfg.text_layers if reranker is not None else ()
    img_emb, img_store, pixels = [], [], []
    for x in ordered_map(load, data, workers, prefetch=2 * batch_size):
        pixels.append(x)
        if len(pixels) == batch_size:
            _images(encoder, reranker, torch.stack(pixels), ilayers, img_emb, img_store)
            pixels = []
    if pixels:
        _images(encoder, reranker, torch.stack(pixels), ilayers, img_emb, img_store)
    texts = [c for item in data for c in item.captions]
    owner = np.array([i for i, item in enumerate(data) for _ in item.captions])
    txt_emb, txt_store, masks = [], [], []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            out = encoder.encode_texts(texts[s:s + batch_size], tlayers)
            txt_emb.append(out.embeddings)
            if reranker is not None:
                feats, mask = reranker.encode_text_store(out.tokens, out.mask)
                txt_store.append(feats.half())
                masks.append(mask)
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return Features(torch.cat(img_emb), torch.cat(txt_emb), owner, texts, cat(img_store), cat(txt_store), cat(masks))


def _images(encoder, reranker, pixels, layers, emb, store) -> None:
    out = encoder.encode_images(pixels, layers)
    emb.append(out.embeddings)
    if reranker is not None:
        with torch.inference_mode():
            store.append(reranker.encode_image_store(out.tokens, out.grid).half())


@torch.inference_mode()
def rank(features: Features, reranker: FusionReranker | None = None, rerank_k: int = 0) -> Ranks:
    """Ranks of the true matches; with a reranker, the top `rerank_k` of recall are re-scored first."""
    f = features
    sim = f.text_emb @ f.image_emb.T  # (Nt, Ni)
    t2i_order = _reranked(sim, rerank_k, reranker, lambda q, c: (c, q), f)  # captions query images
    i2t_order = _reranked(sim.T, rerank_k, reranker, lambda q, c: (q, c), f)  # images query captions
    t2i = _first_hit(t2i_order, lambda q: np.array([f.caption_image[q]]))
    by_image = [np.flatnonzero(f.caption_image == i) for i in range(len(f.image_emb))]
    i2t = _first_hit(i2t_order, lambda q: by_image[q])
    return Ranks(t2i, i2t)


def _reranked(sim: torch.Tensor, k: int, reranker, pair, f: Features) -> np.ndarray:
    """Full ranking of candidates per query row; the first k re-ordered by the fused score."""
    order = torch.argsort(sim, dim=1, descending=True)  # (Q, C)
    if reranker is None or k <= 0:
        return order.numpy()
    k = min(k, sim.shape[1])
    q = torch.arange(sim.shape[0]).repeat_interleave(k)  # (Q*k,)
    c = order[:, :k].reshape(-1)
    logits = torch.empty(len(q))
    for s in range(0, len(q), PAIR_CHUNK):
        img, txt = pair(q[s:s + PAIR_CHUNK], c[s:s + PAIR_CHUNK])
        logits[s:s + PAIR_CHUNK] = reranker(f.image_store[img], f.text_store[txt], f.text_mask[txt]).float()
    fused = reranker.score(logits, sim[q, c]).view(-1, k)  # (Q, k)
    top = torch.gather(order[:, :k], 1, torch.argsort(fused, dim=1, descending=True))
    return torch.cat([top, order[:, k:]], 1).numpy()


def _first_hit(order: np.ndarray, truth) -> np.ndarray:
    return np.array([np.flatnonzero(np.isin(row, truth(q)))[0] for q, row in enumerate(order)])


def recall(ranks: Ranks, ks: Sequence[int] = KS, images: np.ndarray | None = None,
           caption_image: np.ndarray | None = None) -> dict[str, float]:
    """R@K in percent for both directions, and RSUM; `images` (bool per image) restricts the queries."""
    t2i, i2t = ranks.t2i, ranks.i2t
    if images is not None:
        t2i, i2t = t2i[images[caption_image]], i2t[images]
    out = {f"t2i_r{k}": 100 * float(np.mean(t2i < k)) for k in ks}
    out |= {f"i2t_r{k}": 100 * float(np.mean(i2t < k)) for k in ks}
    out["rsum"] = sum(out.values())
    return out
