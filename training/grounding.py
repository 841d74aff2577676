"""Grounding: which tokens a caption's grounded phrase spans, which image regions its box covers, and the
targets of the grounding and region-word losses."""
from __future__ import annotations

import functools
from typing import Iterator

import torch

from itm.common.errors import ItmError
from itm.models.encoder import DualEncoder
from itm.models.fusion import FusionReranker

from .batches import Row
from .data import ImageCaptions, Phrase
from .loss import (
    Grounding,
    PhraseWords,
    RegionWordHeads,
)
from .options import TrainOptions, check_layers, reader_config


def region_word_heads(encoder: DualEncoder, reranker: FusionReranker | None, data: list[ImageCaptions],
                       opts: TrainOptions) -> RegionWordHeads | None:
    """The word classifiers of opts.region_words, over every token id of the data's grounded phrases, at
    the image layers the reranker reads; None when the loss is off."""
    if not opts.region_words:
        return None
    if opts.region_words < 0 or not opts.train_encoders:
        raise ItmError(f"region_words shapes the image tower: it is a positive weight and needs the encoders "
                       f"to train (got {opts.region_words}, train_encoders={opts.train_encoders})")
    vocabulary = sorted({t for d in data for text, phrases in zip(d.captions, d.phrases) for p in phrases
                         for t in phrase_words(encoder.tokenizer, text, p)})
    if not vocabulary:
        raise ItmError("region_words reads grounded phrases, and the data grounds none (a Karpathy "
                       "sentence's \"phrases\")")
    cfg = reader_config(encoder, reranker, opts)
    check_layers(f"fusion config {cfg.name}", cfg.image_layers, encoder.n_image_layers)
    return RegionWordHeads(tuple(vocabulary), tuple(cfg.image_layers), encoder.image_width).to(opts.device)


def phrase_word_targets(encoder: DualEncoder, heads: RegionWordHeads, grid: tuple[int, int], data: list[ImageCaptions],
                  rows: list[Row], device: str) -> PhraseWords | None:
    """The batch captions' grounded phrases: each one's box share of the image tokens, and its words."""
    if grid[0] != grid[1]:
        raise ItmError(f"region_words pools a square grid of image tokens; this tower's is {grid[0]} x {grid[1]}")
    pairs, shares, words = [], [], []
    for i, text, phrase, share in grounded_phrases(data, rows, grid[0]):
        pairs.append(i)
        shares.append(share)
        hot = torch.zeros(len(heads.vocabulary))
        hot[[heads.index[t] for t in phrase_words(encoder.tokenizer, text, phrase) if t in heads.index]] = 1
        words.append(hot)
    if not pairs:
        return None
    return PhraseWords(torch.tensor(pairs, device=device), torch.stack(shares).to(device),
                       torch.stack(words).to(device))


def grounding_targets(encoder: DualEncoder, cfg, data: list[ImageCaptions], rows: list[Row],
               device: str) -> Grounding | None:
    """The grounded tokens of a batch's captions: every token of each phrase, with its box's share of each region."""
    pairs, tokens, targets = [], [], []
    for i, text, phrase, share in grounded_phrases(data, rows, cfg.regions):
        for k in phrase_tokens(encoder.tokenizer, text, phrase):
            if k < cfg.max_text_tokens - 1:  # the store keeps the first Tt-1 tokens, then the end token
                pairs.append(i)
                tokens.append(k)
                targets.append(share)
    if not pairs:
        return None
    return Grounding(torch.tensor(pairs, device=device), torch.tensor(tokens, device=device),
                     torch.stack(targets).to(device))


def grounded_phrases(data: list[ImageCaptions], rows: list[Row],
                      regions: int) -> Iterator[tuple[int, str, Phrase, torch.Tensor]]:
    """Each grounded phrase of a batch's captions: its batch row, its caption, the phrase, and its box's share
    of each region of a regions x regions grid (region_shares)."""
    for i, r in enumerate(rows):
        item = data[r.item]
        text = item.captions[r.caption]
        for phrase in item.phrases[r.caption] if item.phrases else ():
            yield i, text, phrase, region_shares(phrase.box, regions)


@functools.lru_cache(maxsize=1 << 18)  # every step asks again for the captions of earlier epochs
def phrase_tokens(tokenizer, text: str, phrase: Phrase) -> range:
    """Positions of a phrase's tokens in the text's token ids (start token at 0), for tokenizers that split
    words before BPE as CLIP's does, so that a prefix ending at a word boundary encodes as a prefix."""
    check_bpe(tokenizer, "train with --grounding-weight 0 for this model")
    return range(1 + len(tokenizer.encode(text[:phrase.start])), 1 + len(tokenizer.encode(text[:phrase.end])))


@functools.lru_cache(maxsize=1 << 18)  # every step asks again for the captions of earlier epochs
def phrase_words(tokenizer, text: str, phrase: Phrase) -> tuple[int, ...]:
    """The token ids of a phrase's words (CLIP's BPE splits words before merging, so they are the ids its
    tokens have in the text)."""
    check_bpe(tokenizer, "train without region_words for this model")
    return tuple(tokenizer.encode(text[phrase.start:phrase.end]))


def check_bpe(tokenizer, advice: str) -> None:
    if not hasattr(tokenizer, "encode"):
        raise ItmError(f"grounded phrases need a tokenizer with encode() (CLIP's BPE); {advice}")


@functools.lru_cache(maxsize=1 << 16)  # callers copy it (torch.stack), never change it in place
def region_shares(box: tuple[float, float, float, float], regions: int) -> torch.Tensor:
    """(1 + regions**2,) the share of `box` (fractions of the image) in each region of the grid, row by row,
    after a zero for the CLS token: the attention a phrase naming that box should pay."""
    edges = torch.linspace(0, 1, regions + 1)
    x0, y0, x1, y1 = box
    wx = (torch.clamp(edges[1:], max=x1) - torch.clamp(edges[:-1], min=x0)).clamp_min(0)  # (R,)
    wy = (torch.clamp(edges[1:], max=y1) - torch.clamp(edges[:-1], min=y0)).clamp_min(0)
    area = (wy[:, None] * wx[None]).flatten()  # (R*R,)
    return torch.cat([torch.zeros(1), area / area.sum()])
