"""Recall@K in both directions, recall-only and two-stage, by the standard protocol.

Text -> image: each caption is a query; it is answered when its own image is within the top K.
Image -> text: each image is a query; it is answered when any of its captions is within the top K.
RSUM adds the six recalls (R@1/5/10, both directions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from itm.common.errors import DecodeError, ItmError
from itm.common.parallel import ordered_map
from itm.models.encoder import DualEncoder
from itm.models.fusion import FusionReranker
from itm.retrieval.rerank import rerank_top

from .data import ImageCaptions

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
    t2i_order: np.ndarray  # (Nt, Ni) images in ranked order, per caption
    i2t_order: np.ndarray  # (Ni, Nt) captions in ranked order, per image


def embed_dataset(encoder: DualEncoder, reranker: FusionReranker | None, data: Sequence[ImageCaptions],
                  batch_size: int = 128, workers: int = 2) -> Features:
    def load(item: ImageCaptions) -> torch.Tensor:
        try:
            return encoder.load_pixels(item.image)
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
    return rankings(features, reranker, rerank_k)[0]


@torch.inference_mode()
def rankings(features: Features, reranker: FusionReranker | None = None, rerank_k: int = 0,
             weights: Sequence[float | None] = (None,)) -> list[Ranks]:
    """`rank` for each score weight of the match logit (None: the reranker's own), the logits computed once."""
    f = features
    sim = f.text_emb @ f.image_emb.T  # (Nt, Ni)
    t2i = _candidates(sim, rerank_k, reranker, lambda q, c: (c, q), f)  # captions query images
    i2t = _candidates(sim.T, rerank_k, reranker, lambda q, c: (q, c), f)  # images query captions
    by_image = [np.flatnonzero(f.caption_image == i) for i in range(len(f.image_emb))]
    out = []
    for w in weights:
        t2i_order, i2t_order = t2i.order_by(reranker, w), i2t.order_by(reranker, w)
        out.append(Ranks(_first_hit(t2i_order, lambda q: np.array([f.caption_image[q]])),
                         _first_hit(i2t_order, lambda q: by_image[q]), t2i_order, i2t_order))
    return out


@dataclass(frozen=True)
class _Candidates:
    """Every candidate of each query row in recall order, and the recall similarity and match logit of the first k."""

    order: np.ndarray  # (Q, C)
    sim: torch.Tensor | None = None  # (Q, k); None when nothing is reranked
    logits: torch.Tensor | None = None  # (Q, k)

    def order_by(self, reranker: FusionReranker | None, weight: float | None) -> np.ndarray:
        """The full ranking: the first k re-ordered by the fused score with `weight`."""
        if self.logits is None:
            return self.order
        return rerank_top(self.order, reranker.score(self.logits, self.sim, weight).numpy())


def _candidates(sim: torch.Tensor, k: int, reranker, pair, f: Features) -> _Candidates:
    order = torch.argsort(sim, dim=1, descending=True)  # (Q, C)
    if reranker is None or k <= 0:
        return _Candidates(order.numpy())
    k = min(k, sim.shape[1])
    q = torch.arange(sim.shape[0]).repeat_interleave(k)  # (Q*k,)
    c = order[:, :k].reshape(-1)
    logits = torch.empty(len(q))
    for s in range(0, len(q), PAIR_CHUNK):
        img, txt = pair(q[s:s + PAIR_CHUNK], c[s:s + PAIR_CHUNK])
        logits[s:s + PAIR_CHUNK] = reranker(f.image_store[img], f.text_store[txt], f.text_mask[txt]).float()
    return _Candidates(order.numpy(), sim[q, c].view(-1, k), logits.view(-1, k))


@torch.inference_mode()
def swap_accuracy(encoder: DualEncoder, reranker: FusionReranker | None, features: Features,
                  negatives: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray | None]:
    """Does each caption outscore its false twin (`negatives`, aligned with features.texts) on its own image?

    Returns one bool per caption that has a negative: by dual-encoder similarity, and by the
    fused score (None without a reranker).
    """
    scores = swap_scores(encoder, reranker, features, negatives)
    return scores.dual(), scores.fused(reranker) if reranker is not None else None


@dataclass(frozen=True)
class SwapScores:
    """Recall similarities (and match logits, with a reranker) of each caption that has a false twin and of
    that twin, on the caption's own image."""

    pos_sim: torch.Tensor
    neg_sim: torch.Tensor
    pos_logit: torch.Tensor | None = None
    neg_logit: torch.Tensor | None = None

    def dual(self) -> np.ndarray:
        return (self.pos_sim > self.neg_sim).numpy()

    def fused(self, reranker: FusionReranker, weight: float | None = None) -> np.ndarray:
        return (reranker.score(self.pos_logit, self.pos_sim, weight)
                > reranker.score(self.neg_logit, self.neg_sim, weight)).numpy()


@torch.inference_mode()
def swap_scores(encoder: DualEncoder, reranker: FusionReranker | None, features: Features,
                negatives: Sequence[str | None]) -> SwapScores:
    f = features
    which = np.array([n is not None for n in negatives])
    negs = [n for n in negatives if n is not None]
    owner = torch.from_numpy(f.caption_image[which])
    idx = torch.from_numpy(np.flatnonzero(which))
    image_emb = f.image_emb[owner]
    pos_sim = (image_emb * f.text_emb[idx]).sum(-1)
    layers = reranker.cfg.text_layers if reranker is not None else ()
    out = [encoder.encode_texts(negs[s:s + 256], layers) for s in range(0, len(negs), 256)]
    neg_sim = (image_emb * torch.cat([o.embeddings for o in out])).sum(-1)
    if reranker is None:
        return SwapScores(pos_sim, neg_sim)
    pos, neg = [], []
    for s, o in zip(range(0, len(negs), 256), out):
        img = f.image_store[owner[s:s + 256]]
        pos.append(reranker(img, f.text_store[idx[s:s + 256]], f.text_mask[idx[s:s + 256]]))
        store, mask = reranker.encode_text_store(o.tokens, o.mask)
        neg.append(reranker(img, store.half(), mask))
    return SwapScores(pos_sim, neg_sim, torch.cat(pos), torch.cat(neg))


def _first_hit(order: np.ndarray, truth) -> np.ndarray:
    return np.array([np.flatnonzero(np.isin(row, truth(q)))[0] for q, row in enumerate(order)])


def truth_recall(ranks: Ranks, truth: np.ndarray, queries: np.ndarray | None = None,
                 images: np.ndarray | None = None) -> dict[str, float]:
    """Truth-aware figures (percent): is the top image (any of the top 5) one the caption is true of, and is
    the top caption true of the image? truth (Nt, Ni) bool; `queries` / `images` restrict the captions and
    images asked (bool masks)."""
    t_sel = np.ones(len(truth), bool) if queries is None else queries
    i_sel = np.ones(truth.shape[1], bool) if images is None else images
    q = np.flatnonzero(t_sel)
    top5 = ranks.t2i_order[q, :5]
    t2i = truth[q[:, None], top5]  # (q, 5)
    i = np.flatnonzero(i_sel)
    i2t = truth[ranks.i2t_order[i, 0], i]
    return {"t2i_truth1": 100 * float(t2i[:, 0].mean()), "t2i_truth5": 100 * float(t2i.any(1).mean()),
            "i2t_truth1": 100 * float(i2t.mean())}


def oracle_recall(truth: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = KS,
                  queries: np.ndarray | None = None, images: np.ndarray | None = None) -> dict[str, float]:
    """Expected R@K of an oracle that ranks everything true first, ties broken at random.

    Text -> image: the caption's own image is one of n true images, so R@K = min(1, K/n). Image -> text:
    the image's c own captions are among n true ones; R@K = 1 - C(n-c, K) / C(n, K).
    """
    t_sel = np.ones(len(truth), bool) if queries is None else queries
    i_sel = np.ones(truth.shape[1], bool) if images is None else images
    n_t2i = truth[t_sel].sum(1)  # true images per caption
    n_i2t = truth[:, i_sel].sum(0)  # true captions per image
    own = np.bincount(caption_image, minlength=truth.shape[1])[i_sel]
    out = {f"t2i_r{k}": 100 * float(np.mean(np.minimum(1.0, k / n_t2i))) for k in ks}
    for k in ks:
        miss = [math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0.0 for n, c in zip(n_i2t, own)]
        out[f"i2t_r{k}"] = 100 * (1 - float(np.mean(miss)))
    out["rsum"] = sum(out.values())
    return out


def pair_wins(order: np.ndarray, queries: np.ndarray, right: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """For each query q (a row of `order`), is item right[q] ranked above item wrong[q]?"""
    rows = order[queries]  # (n, C)
    pos_right = np.argmax(rows == right[:, None], axis=1)
    pos_wrong = np.argmax(rows == wrong[:, None], axis=1)
    return pos_right < pos_wrong


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
