"""Seeded dataset splits of the synthetic world.

Every image is drawn from seeds derived from (seed, split, index), so any image
can be regenerated alone and the result never depends on generation order.

Test images come in pairs. For half of the pairs the second image is a
confusable twin of the first: the same objects with two colours exchanged, or
with two objects in each other's cells, so that a bag of words cannot tell the
two apart. Every caption of a twin is false of its partner, so a retrieval
metric can count the partner as a plain miss.

Colour-shape pairs in `HELD_OUT` occur only in the test split: not in train or
val scenes, captions or hard negatives. Train and val images can come in twin
pairs too (`twin_fraction`), as hard negative images for training and validation.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .captions import CaptionParts, caption_matches, describe, more_negatives, negative_parts, render_caption
from .render import render_scene
from .world import OBJECT_COUNT_P, Scene, sample_scene, swap_colours, swap_positions

SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
TWIN_FRACTION = 0.5      # test pairs whose second image is a twin of the first
TEST_HELD_OUT_P = 0.3    # test scenes given a held-out pair on purpose (more occur by chance)
TWIN_KINDS = ("colour_swap", "position_swap")


@dataclass(frozen=True)
class Sample:
    """One image: its scene, true captions, one false caption per true one."""

    image_id: str
    scene: Scene
    captions: tuple[str, ...]
    hard_negatives: tuple[str, ...]
    held_out: bool                          # scene has a colour-shape pair from HELD_OUT
    split: str
    render_seed: int
    image_size: int = 64
    twin_id: str | None = None              # the test image this one is a confusable twin of
    twin_kind: str | None = None            # one of TWIN_KINDS
    negative_kinds: tuple[str, ...] = ()    # which edit made each hard negative
    more_negatives: tuple[tuple[str, ...], ...] = ()  # per caption, its other false edits (more_negatives)

    def render(self) -> Image.Image:
        return render_scene(self.scene, self.image_size, self.render_seed)


def _rng(seed: int, split: str, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODE[split], index, purpose])


def _twin(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    i, j = (int(k) for k in rng.permutation(len(scene.objects))[:2])
    kind = TWIN_KINDS[int(rng.integers(2))]
    if kind == "colour_swap":
        return swap_colours(scene, i, j), kind
    return swap_positions(scene, i, j), kind


@lru_cache(maxsize=16)
def _test_pair(seed: int, pair: int) -> tuple[Scene, Scene, str | None]:
    """Scenes of test images 2*pair and 2*pair+1, and the twin kind if they are twins."""
    rng = _rng(seed, "test", pair, 0)
    is_twin = rng.random() < TWIN_FRACTION
    if is_twin:
        p_three = OBJECT_COUNT_P[2] / (OBJECT_COUNT_P[1] + OBJECT_COUNT_P[2])
        n_objects = 3 if rng.random() < p_three else 2
        base = sample_scene(rng, n_objects=n_objects, force_held_out=rng.random() < TEST_HELD_OUT_P)
        twin, kind = _twin(base, rng)
        return base, twin, kind
    first = sample_scene(rng, force_held_out=rng.random() < TEST_HELD_OUT_P)
    second = sample_scene(rng, force_held_out=rng.random() < TEST_HELD_OUT_P)
    return first, second, None


def _captions(scene: Scene, rng: np.random.Generator, n: int, allow_held_out: bool, twin: Scene | None,
              more_rng: np.random.Generator) -> tuple[tuple[str, ...], ...]:
    """n distinct true captions (false of the twin, if any), their negatives, negative kinds and more
    negatives (drawn with `more_rng`, so that the rest are what they were before there were any).

    Fewer than n only if the grammar runs out of wordings, which it does not at n = 5.
    """
    chosen: dict[str, CaptionParts] = {}
    for _ in range(50 * n):
        if len(chosen) == n:
            break
        parts = describe(scene, rng)
        if twin is None or not caption_matches(twin, parts):
            chosen.setdefault(render_caption(parts), parts)
    negs, kinds, more = [], [], []
    for parts in chosen.values():
        neg, kind = negative_parts(scene, parts, rng, allow_held_out=allow_held_out)
        negs.append(render_caption(neg))
        kinds.append(kind)
        more.append(more_negatives(scene, parts, more_rng, allow_held_out=allow_held_out, exclude=(negs[-1],)))
    return tuple(chosen), tuple(negs), tuple(kinds), tuple(more)


@lru_cache(maxsize=16)
def _seen_pair(seed: int, split: str, pair: int, twin_fraction: float) -> tuple[Scene, Scene, str] | None:
    """A twin pair of train/val scenes (no held-out pair in either), or None for two independent images."""
    rng = _rng(seed, split, pair, 2)
    if rng.random() >= twin_fraction:
        return None
    p_three = OBJECT_COUNT_P[2] / (OBJECT_COUNT_P[1] + OBJECT_COUNT_P[2])
    base = sample_scene(rng, n_objects=3 if rng.random() < p_three else 2, allow_held_out=False)
    twin, kind = _twin(base, rng)
    return None if twin.has_held_out else (base, twin, kind)


def _sample(split: str, i: int, n_images: int, seed: int, image_size: int,
            captions_per_image: int, twin_fraction: float = 0.0) -> Sample:
    rng = _rng(seed, split, i, 1)
    render_seed = int(rng.integers(2**32))
    twin_id = twin_kind = twin = None
    pair = _test_pair(seed, i // 2) if split == "test" else \
        _seen_pair(seed, split, i // 2, twin_fraction) if twin_fraction > 0 else None
    if pair is not None:
        scene = pair[i % 2]
        if pair[2] is not None and (i ^ 1) < n_images:
            twin_id, twin_kind, twin = _image_id(split, i ^ 1), pair[2], pair[1 - i % 2]
    else:
        scene = sample_scene(rng, allow_held_out=False)
    caps, negs, kinds, more = _captions(scene, rng, captions_per_image, split == "test", twin,
                                        _rng(seed, split, i, 3))
    return Sample(_image_id(split, i), scene, caps, negs, scene.has_held_out, split, render_seed,
                  image_size, twin_id, twin_kind, kinds, more)


def _image_id(split: str, i: int) -> str:
    return f"{split}_{i:06d}"


def generate_split(split: str, n_images: int, seed: int, *, image_size: int = 64,
                   captions_per_image: int = 5, start: int = 0, stop: int | None = None,
                   twin_fraction: float = 0.0) -> list[Sample]:
    """Samples of one split; the same arguments always give the same samples and pixels.

    `start`/`stop` select a slice of the split's `n_images` samples without
    generating the rest (the slice equals the same slice of the whole list).
    `twin_fraction` makes that share of train/val image pairs confusable twins
    (the test split always has TWIN_FRACTION; 0 leaves train/val as they were).

    >>> s = generate_split("test", 4, seed=0)
    >>> len(s), len(s[0].captions), s[0].render().size
    (4, 5, (64, 64))
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    stop = n_images if stop is None else min(stop, n_images)
    if split == "test" and twin_fraction:
        raise ValueError("the test split's twins are fixed; twin_fraction applies to train and val")
    return [_sample(split, i, n_images, seed, image_size, captions_per_image, twin_fraction)
            for i in range(start, stop)]
