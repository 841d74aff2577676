"""Training losses for the dual encoders and the fusion reranker, as named parts of one module.

- contrastive: symmetric InfoNCE on the pooled dual embeddings, learnable temperature; known
  false captions (a caption's binding swap or relation flip) join each image's softmax as extra
  negatives, as NegCLIP does.
- matching: binary cross-entropy on fusion match logits for the positive pairs and for hard
  negatives mined from the in-batch dual similarity, in both directions, plus each image's
  known false captions and each caption's known confusable image.
- ranking: VSE++ max-violation margin loss on the same fusion logits, plus the same margin between
  each caption and each of its own known false captions on its image (negatives that differ from
  it in nothing but a binding, a relation or one attribute, which a max over many negatives may
  pass over).
- grounding (where the data grounds phrases in boxes): cross-entropy between each grounded text
  token's attention over image regions, at every fusion level, and the share of the phrase's box
  in each region, as supervised-attention grounding does. Without it, a reranker trained from
  scratch learns which object a phrase names but not where it is, and cannot tell "A left of B"
  from "A right of B".
- separation (encoder training, where the data names token negatives): a hinge that keeps each caption's
  text-tower tokens apart from its token negative's (a caption worded like it that a pooled embedding
  need not tell from it, such as its relation flip), at every layer the reranker reads, so that the
  reranker has something to read the difference from (`token_distances`).
- region words (encoder training, where the data grounds phrases in boxes): each grounded phrase's words
  predicted, one sigmoid per word of the data's phrase vocabulary, from the image tokens its box covers,
  pooled, at every layer the reranker reads. A word's sigmoid reads one attribute whatever the others
  are, so the loss asks the image tower for a cell's colour and its shape as separate readings, not one
  conjoint code that a colour-shape pair absent from training falls outside of (`RegionWordHeads`).

>>> loss_fn = ItmLoss(hard_negatives="hardest")
>>> parts = loss_fn(model, image_feats, text_feats, text_mask, image_emb, text_emb)  # doctest: +SKIP
>>> parts["total"].backward()  # doctest: +SKIP
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itm.models.fusion import FusionReranker

PARTS = ("contrastive", "matching", "ranking")
MINING_MODES = ("sample", "hardest")


def positive_mask(n: int, image_ids: Tensor | None = None, text_ids: Tensor | None = None,
                  device: torch.device | str | None = None) -> Tensor:
    """(n, n) bool: True where image row i and text column j match (the diagonal, a shared image or text id)."""
    pos = torch.eye(n, dtype=torch.bool, device=device)
    for ids in (image_ids, text_ids):
        if ids is not None:
            pos |= ids[:, None] == ids[None, :]
    return pos


def contrastive_loss(logits: Tensor, positives: Tensor, extra_negatives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over (B, B) image-text logits; each row's target is its own column.

    Other positives in a row (the same image with another caption) are dropped from the softmax
    instead of being pushed away as negatives. extra_negatives (B, N), if given, are logits of
    images against texts known to be false (-inf where absent): more columns of the image->text
    softmax only.
    """
    others = positives & ~torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(others, float("-inf"))  # (B, B)
    target = torch.arange(len(logits), device=logits.device)
    rows = logits if extra_negatives is None else torch.cat([logits, extra_negatives], 1)  # (B, B + N)
    return (F.cross_entropy(rows, target) + F.cross_entropy(logits.T, target)) / 2


@dataclass(frozen=True)
class KnownNegatives:
    """Negatives the data names, beside the mined ones.

    texts: false captions of each image (e.g. its caption with two colours swapped), N per image in
    blocks of B rows (block k holds each image's k-th), as store features (N*B, Lt, Tt, D), mask
    (N*B, Tt) and unit embeddings (N*B, E); text_valid (N*B,) says which rows hold one. images (B,):
    for each caption, the batch row of an image it is false of though confusable with its own (a
    twin), or -1.
    """

    text_feats: Tensor | None = None
    text_mask: Tensor | None = None
    text_emb: Tensor | None = None
    text_valid: Tensor | None = None
    images: Tensor | None = None


@dataclass(frozen=True)
class Grounding:
    """Grounded text tokens of a batch's positive pairs: token tokens[n] of pair rows[n] names an object
    whose box covers the image tokens in proportion targets[n] (N, Ti), rows summing to 1."""

    rows: Tensor  # (N,)
    tokens: Tensor  # (N,)
    targets: Tensor  # (N, Ti)


@dataclass(frozen=True)
class PhraseWords:
    """Grounded phrases of a batch's captions: phrase n's box covers image row rows[n]'s tokens in
    proportion shares[n] (N, Ti), rows summing to 1, and words[n] (N, V) marks the vocabulary words it holds."""

    rows: Tensor  # (N,)
    shares: Tensor  # (N, Ti)
    words: Tensor  # (N, V) float, 0 or 1


class RegionWordHeads(nn.Module):
    """One linear word classifier per image layer, over `vocabulary` (token ids), for `region_word_loss`.
    Used in training only: the encoder it shapes is saved without it."""

    def __init__(self, vocabulary: tuple[int, ...], layers: tuple[int, ...], width: int):
        super().__init__()
        self.vocabulary, self.layers = vocabulary, layers
        self.index = {token: i for i, token in enumerate(vocabulary)}
        self.heads = nn.ModuleList(nn.Linear(width, len(vocabulary)) for _ in layers)


def region_word_loss(tokens: list[Tensor], heads: RegionWordHeads, phrases: PhraseWords) -> Tensor:
    """Mean over layers and phrases of the summed per-word binary cross-entropy of each phrase's words
    against its box's pooled, normalized image tokens; tokens: one (B, Ti, W) tensor per heads.layers."""
    losses = []
    for t, head in zip(tokens, heads.heads):
        pooled = torch.einsum("nt,ntw->nw", phrases.shares, t[phrases.rows])  # (N, W)
        logits = head(F.layer_norm(pooled, pooled.shape[-1:]))
        losses.append(F.binary_cross_entropy_with_logits(logits, phrases.words, reduction="none").sum(1).mean())
    return sum(losses) / len(losses)


def token_distances(a: list[Tensor], b: list[Tensor], mask: Tensor) -> Tensor:
    """(layers, N): for each pair of texts, the largest cosine distance between their features at any
    position both have (mask (N, T)), per layer; a, b: one (N, T, W) tensor per layer. 0 where a tower
    makes the two texts alike at every token."""
    return torch.stack([(1 - F.cosine_similarity(x, y, dim=-1)).masked_fill(~mask, 0).amax(1)
                        for x, y in zip(a, b)])


def token_separation_loss(a: list[Tensor], b: list[Tensor], mask: Tensor, margin: float) -> Tensor:
    """Hinge on `token_distances`: each pair's distance at each layer must reach `margin`."""
    return F.relu(margin - token_distances(a, b, mask)).mean()


def grounding_loss(maps: list[Tensor], grounding: Grounding) -> Tensor:
    """Mean over levels and grounded tokens of the cross-entropy of attention maps (B, Tt, Ti) to the targets."""
    keep = grounding.tokens < maps[0].shape[1]  # tokens past the cut text length are not stored
    rows, tokens, targets = grounding.rows[keep], grounding.tokens[keep], grounding.targets[keep]
    if not len(rows):
        return maps[0].new_zeros(())
    losses = [-(targets * m[rows, tokens].clamp_min(1e-6).log()).sum(-1).mean() for m in maps]
    return sum(losses) / len(losses)


@dataclass(frozen=True)
class HardNegatives:
    texts: Tensor  # (B, m) for image i, indices of confusable non-matching texts
    texts_valid: Tensor  # (B, m) False where the batch had fewer than m non-matching texts
    images: Tensor  # (B, m) for text j, indices of confusable non-matching images
    images_valid: Tensor  # (B, m)


def mine_hard_negatives(sim: Tensor, positives: Tensor, num: int = 1, mode: str = "sample",
                        generator: torch.Generator | None = None, num_random: int = 0) -> HardNegatives:
    """Pick `num` negatives per image (a row of sim) and per text (a column) from the batch.

    "hardest" takes the most similar non-matching items; "sample" draws without replacement with
    probability proportional to softmax(sim) (Gumbel top-k), as ALBEF does. `num_random` more are
    drawn uniformly from the rest: with only hard negatives, which differ from the positive in one
    binding or relation, a fusion model from scratch has no easier signal to start from and
    collapses to a constant logit. An invalid slot points at the anchor's own positive, so every
    index is usable; the valid masks say which to count.
    """
    if mode not in MINING_MODES:
        raise ValueError(f"hard_negatives must be one of {', '.join(MINING_MODES)}, not {mode!r}")
    with torch.no_grad():
        own = torch.arange(len(sim), device=sim.device)[:, None]  # (B, 1)

        def top(s: Tensor, pos: Tensor, n: int) -> tuple[Tensor, Tensor]:
            vals, idx = s.masked_fill(pos, float("-inf")).topk(min(n, s.shape[1]), dim=1)  # (B, n)
            valid = torch.isfinite(vals)
            return torch.where(valid, idx, own), valid

        def gumbel(s: Tensor) -> Tensor:
            return s - torch.empty_like(s).exponential_(generator=generator).log()

        def pick(s: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:  # rows are the anchors
            idx, valid = top(gumbel(s) if mode == "sample" else s, pos, num)
            if num_random:
                taken = pos.clone()
                taken.scatter_(1, idx, True)
                more, more_valid = top(gumbel(torch.zeros_like(s)), taken, num_random)
                idx, valid = torch.cat([idx, more], 1), torch.cat([valid, more_valid], 1)
            return idx, valid

        texts, texts_valid = pick(sim.float(), positives)
        images, images_valid = pick(sim.float().T, positives.T)
    return HardNegatives(texts, texts_valid, images, images_valid)


def matching_loss(pos_logits: Tensor, neg_logits: Tensor, neg_valid: Tensor) -> Tensor:
    """Binary cross-entropy: positives (B,) labelled 1, the valid negatives of neg_logits (...) labelled 0."""
    logits = torch.cat([pos_logits, neg_logits[neg_valid]])
    labels = torch.cat([torch.ones_like(pos_logits), torch.zeros_like(logits[len(pos_logits):])])
    return F.binary_cross_entropy_with_logits(logits, labels)


def ranking_loss(pos_logits: Tensor, neg_logits: Tensor, neg_valid: Tensor, margin: float) -> Tensor:
    """VSE++ max-violation: each anchor's highest-scoring negative must stay `margin` below its positive.

    pos_logits (B,); neg_logits, neg_valid (..., B, m): the m mined negatives of each anchor.
    Anchors without a valid negative are left out.
    """
    hardest = neg_logits.masked_fill(~neg_valid, float("-inf")).amax(-1)  # (..., B)
    has = neg_valid.any(-1)
    violation = F.relu(margin - pos_logits + hardest)[has]
    return violation.sum() / has.sum().clamp_min(1)


class ItmLoss(nn.Module):
    """Contrastive + matching + ranking, weighted; returns each part unweighted, and the weighted "total".

    Holds the learnable temperature (a log-scale parameter clamped like CLIP's), so pass this
    module's parameters to the optimiser too. A part with weight 0 is still computed and
    reported, but adds nothing to "total" or to its gradient.

    Args:
        contrastive_weight, matching_weight, ranking_weight: weights of the three parts.
        margin: ranking margin, in match-logit units.
        num_negatives: hard negatives mined per image and per text; the fusion model then runs on
            B * (1 + 2 * num_negatives) pairs.
        random_negatives: negatives drawn uniformly per image and per text, beside the mined ones.
        hard_negatives: "sample" (proportional to softmax of the dual similarity) or "hardest".
        init_temperature, max_logit_scale: the contrastive temperature starts at init_temperature;
            its inverse (the logit scale) is clamped to at most max_logit_scale.
        grounding_weight: weight of the grounding part, computed for batches that come with a Grounding.
    """

    def __init__(self, contrastive_weight: float = 1.0, matching_weight: float = 1.0, ranking_weight: float = 1.0,
                 margin: float = 1.0, num_negatives: int = 1, hard_negatives: str = "sample",
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0, random_negatives: int = 0,
                 grounding_weight: float = 0.0):
        super().__init__()
        if hard_negatives not in MINING_MODES:
            raise ValueError(f"hard_negatives must be one of {', '.join(MINING_MODES)}, not {hard_negatives!r}")
        self.weights = {"contrastive": contrastive_weight, "matching": matching_weight, "ranking": ranking_weight,
                        "grounding": grounding_weight}
        self.margin = margin
        self.num_negatives = num_negatives
        self.random_negatives = random_negatives
        self.hard_negatives = hard_negatives
        self.max_log_scale = math.log(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    @property
    def scale(self) -> Tensor:
        """The contrastive logit scale, 1 / temperature, clamped to [1, max_logit_scale]."""
        return self.logit_scale.clamp(0, self.max_log_scale).exp()

    def forward(self, model: FusionReranker | None, image_feats: Tensor | None, text_feats: Tensor | None,
                text_mask: Tensor | None, image_emb: Tensor, text_emb: Tensor, image_ids: Tensor | None = None,
                text_ids: Tensor | None = None, generator: torch.Generator | None = None,
                known: KnownNegatives | None = None, grounding: Grounding | None = None) -> dict[str, Tensor]:
        """Loss parts for a batch of B matching pairs (row i of every input belongs to pair i).

        image_feats (B, Lv, Ti, D) and text_feats (B, Lt, Tt, D), text_mask (B, Tt): the model's
        store features (computed with gradients when the store projections train). image_emb,
        text_emb (B, E): L2-normalised dual embeddings. image_ids / text_ids (B,): optional; rows
        sharing an id are all positives of each other (one image with several captions, a
        caption repeated for several images), so none is mined or pushed away as a negative.
        known: negatives the data names (false captions, confusable images), used by every part.
        grounding: grounded text tokens of the B positive pairs (the grounding part).
        Without a model, only the contrastive part is computed (dual-encoder training).
        """
        b = len(image_emb)
        known = known or KnownNegatives()
        positives = positive_mask(b, image_ids, text_ids, device=image_emb.device)
        sim = self.scale * image_emb @ text_emb.T  # (B, B) image rows, text columns
        extra = None
        if known.text_emb is not None:
            extra = (self.scale * image_emb @ known.text_emb.T).masked_fill(~known.text_valid[None], float("-inf"))
        parts = {"contrastive": contrastive_loss(sim, positives, extra)}
        if model is not None:
            parts |= self._fusion_parts(model, image_feats, text_feats, text_mask, sim, positives, known, generator,
                                        grounding)
        parts["total"] = sum((w * parts[k] for k, w in self.weights.items() if w and k in parts), sim.new_zeros(()))
        return parts

    def _fusion_parts(self, model: FusionReranker, image_feats: Tensor, text_feats: Tensor, text_mask: Tensor,
                      sim: Tensor, positives: Tensor, known: KnownNegatives,
                      generator: torch.Generator | None, grounding: Grounding | None) -> dict[str, Tensor]:
        b = len(sim)
        neg = mine_hard_negatives(sim.detach(), positives, self.num_negatives, self.hard_negatives, generator,
                                  self.random_negatives)
        m = neg.texts.shape[1]  # fewer than asked when B is small
        anchors = torch.arange(b, device=sim.device)
        image_idx = torch.cat([anchors, anchors.repeat_interleave(m), neg.images.flatten()])  # (B + 2Bm,)
        text_idx = torch.cat([anchors, neg.texts.flatten(), anchors.repeat_interleave(m)])
        texts_valid, images_valid = neg.texts_valid, neg.images_valid  # (B, m) each
        n_hard = n_false = 0
        if known.images is not None:  # each caption's confusable image, where it is in the batch
            has, n_hard = known.images >= 0, b
            image_idx = torch.cat([image_idx, torch.where(has, known.images, anchors)])
            text_idx = torch.cat([text_idx, anchors])
        if known.text_feats is not None:  # each image's false captions, as more texts of the batch
            n_false = len(known.text_feats)
            image_idx = torch.cat([image_idx, anchors.repeat(n_false // b)])
            text_idx = torch.cat([text_idx, b + torch.arange(n_false, device=sim.device)])
            text_feats = torch.cat([text_feats, known.text_feats])
            text_mask = torch.cat([text_mask, known.text_mask])
        logits, maps = model(image_feats, text_feats, text_mask, attention=True, pairs=(image_idx, text_idx))
        pos, neg_texts, neg_images, hard_images, false_caps = logits.split([b, b * m, b * m, n_hard, n_false])
        neg_texts, neg_images = neg_texts.view(b, m), neg_images.view(b, m)
        if known.images is not None:
            neg_images = torch.cat([neg_images, hard_images[:, None]], 1)  # (B, m + 1)
            images_valid = torch.cat([images_valid, has[:, None]], 1)
        if known.text_feats is not None:
            false_caps, false_valid = false_caps.view(-1, b).T, known.text_valid.view(-1, b).T  # (B, N)
            neg_texts = torch.cat([neg_texts, false_caps], 1)  # (B, m + N)
            texts_valid = torch.cat([texts_valid, false_valid], 1)
        parts = {"matching": matching_loss(pos, torch.cat([neg_texts.flatten(), neg_images.flatten()]),
                                           torch.cat([texts_valid.flatten(), images_valid.flatten()]))}
        # per direction: each anchor's highest-scoring negative must stay a margin below its positive
        violations = [ranking_loss(pos, n, v, self.margin) * v.any(-1).sum()
                      for n, v in ((neg_texts, texts_valid), (neg_images, images_valid))]
        anchors_with = texts_valid.any(-1).sum() + images_valid.any(-1).sum()
        if known.text_feats is not None:  # and each caption above each of its own false captions, by the margin
            each = (false_caps.T[..., None], false_valid.T[..., None])  # (N, B, 1): one negative an anchor
            violations.append(ranking_loss(pos, *each, self.margin) * false_valid.sum())
            anchors_with = anchors_with + false_valid.sum()
        parts["ranking"] = sum(violations) / anchors_with.clamp_min(1)
        if grounding is not None:  # the first B pairs are the positives
            parts["grounding"] = grounding_loss([m[:b] for m in maps], grounding)
        return parts
