"""Batches and mining: which images and captions each step sees, their confusable neighbours and false captions."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from itm.common.errors import ItmError
from itm.models.encoder import DualEncoder

from .caches import ImageCache
from .data import ImageCaptions
from .options import TrainOptions


@dataclass(frozen=True)
class Row:
    item: int  # index into the data
    caption: int  # which of its captions


def batch_rows(data: list[ImageCaptions], seed: int, epoch: int, index: int, size: int,
           near: list[list[int]] | None = None) -> list[Row]:
    """The index-th batch of an epoch: a seeded permutation of images, one seeded caption each.

    With a table of confusable images, each anchor brings them along (fewer anchors per batch).
    """
    order = list(range(len(data)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    rng = random.Random(seed * 7_919 + epoch * 104_729 + index)
    if near is None:
        chosen = order[index * size:(index + 1) * size]
    else:
        per = max(1, size // (1 + max(map(len, near), default=0)))
        groups = ([a, *near[a]] for a in order[index * per:(index + 1) * per])
        chosen = list(dict.fromkeys(i for g in groups for i in g))[:size]
    return [Row(i, rng.randrange(len(data[i].captions))) for i in chosen]


def near_table(encoder: DualEncoder, images: "ImageCache", data: list[ImageCaptions],
                opts: TrainOptions) -> list[list[int]] | None:
    """Per image, the images to batch it with: the data's confusable images and/or its nearest ones."""
    named = None
    if opts.hard_images and any(d.hard_images for d in data):
        where = {d.image: i for i, d in enumerate(data)}
        named = [[where[p] for p in d.hard_images if p in where] for d in data]
    if not opts.neighbours:
        return named
    nearest = neighbour_table(encoder, images, data, opts).tolist()
    if named is None:
        return nearest
    return [list(dict.fromkeys(a + b))[:max(1, opts.neighbours)] for a, b in zip(named, nearest)]


def neighbour_table(encoder: DualEncoder, images: "ImageCache", data: list[ImageCaptions],
                     opts: TrainOptions, chunk: int = 256) -> torch.Tensor:
    """(N, neighbours) indices of each image's nearest other images by frozen dual-encoder similarity."""
    if opts.train_encoders:
        raise ItmError("--neighbours needs frozen encoders: their similarity must not drift during training")
    emb = []
    for s in range(0, len(data), chunk):
        pixels, keep = images.get([d.image for d in data[s:s + chunk]])
        out = torch.zeros(len(data[s:s + chunk]), encoder.embed_dim)
        if keep:
            out[keep] = encoder.encode_images(pixels).embeddings.cpu()
        emb.append(out)
    emb = torch.cat(emb)  # (N, E); images that failed to load are zero vectors, nobody's neighbour
    near = []
    for s in range(0, len(emb), chunk):
        sim = emb[s:s + chunk] @ emb.T  # (chunk, N)
        sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = -2  # not your own neighbour
        near.append(sim.topk(opts.neighbours, dim=1).indices)
    return torch.cat(near)


def false_captions(data: list[ImageCaptions], rows: list[Row], opts: TrainOptions,
                    step: int) -> list[list[str | None]]:
    """The batch captions' named false captions, in columns of one per row (None where a row has none): the
    data's hard negative, then opts.more_negatives drawn (seeded by the step) from its more_negatives."""
    if not opts.caption_negatives:
        return []
    columns = [[data[r.item].negatives[r.caption] if data[r.item].negatives else None for r in rows]]
    if opts.more_negatives:
        rng, k = random.Random(opts.seed * 1_000_003 + step), opts.more_negatives
        drawn = []
        for r in rows:
            pool = data[r.item].more_negatives[r.caption] if data[r.item].more_negatives else ()
            picked = rng.sample(pool, min(k, len(pool)))
            drawn.append(picked + [None] * (k - len(picked)))
        columns += [list(c) for c in zip(*drawn)]
    return columns


def hard_image_rows(data: list[ImageCaptions], rows: list[Row]) -> torch.Tensor | None:
    """(B,) for each row's caption, the batch row of an image the data names as confusable with its own, or -1."""
    where = {data[r.item].image: i for i, r in enumerate(rows)}
    out = [next((where[p] for p in data[r.item].hard_images if p in where), -1) for r in rows]
    return torch.tensor(out) if any(i >= 0 for i in out) else None


def texts_of(data: list[ImageCaptions], negatives: bool = True) -> list[str]:
    """Every caption of the data, and with `negatives` every false caption, in order (repeats kept)."""
    return [t for d in data for t in (*d.captions, *(d.negatives or () if negatives else ())) if t]
