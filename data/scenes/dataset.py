"""Seeded dataset splits of the photo-like world.

Every image is drawn from seeds derived from (seed, split, index), so any image can be made
alone and the result never depends on generation order.

Test images come in pairs; half of the pairs are confusable twins: the same things with two of
them in each other's places, or with one more or one fewer of a group. Every caption of a twin
is false of its partner. Train and val pairs can be twins too (`twin_fraction`).

The held-out pairs and wordings of world.HELD_OUT occur only in their own split; a share of the
val and test scenes is made around one of that split's pairs on purpose (more occur by chance).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .captions import caption_matches, render_caption
from .describe import describe, hard_negatives, sayable_relations
from .layout import TWIN_KINDS, change_count, sample_scene, swap_positions
from .render import render_scene
from .world import HELD_OUT, Scene

SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
TWIN_FRACTION = 0.5      # test pairs whose second image is a twin of the first
HELD_OUT_P = 0.3         # val and test scenes made around one of their split's held-out pairs
CAPTION_TRIES = 30       # draws per caption wanted, before settling for fewer distinct ones


@dataclass(frozen=True)
class Sample:
    """One image: its scene, true captions, and a false caption worded like each."""

    image_id: str
    scene: Scene
    captions: tuple[str, ...]
    hard_negatives: tuple[str, ...]
    negative_kinds: tuple[str, ...]              # which edit made each hard negative (describe.NEGATIVE_KINDS)
    more_negatives: tuple[tuple[str, ...], ...]  # per caption, the false captions of the other kinds
    held_out: bool                               # the scene holds a pair held out for its split
    split: str
    render_seed: int
    image_size: int = 160
    twin_id: str | None = None                   # the image this one is a confusable twin of
    twin_kind: str | None = None                 # one of layout.TWIN_KINDS

    def render(self) -> Image.Image:
        return render_scene(self.scene, self.image_size, self.render_seed)


def _rng(seed: int, split: str, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODE[split], index, purpose])


def _group(scene: Scene, i: int) -> list[int]:
    t = scene.things[i]
    return [k for k, u in enumerate(scene.things) if (u.category, u.colour) == (t.category, t.colour)]


def _swap_changes(base: Scene, twin: Scene, i: int, j: int) -> bool:
    """Does some relation between i's and j's groups hold in each scene and not in the other?"""
    a, b = _group(base, i), _group(base, j)
    before, after = set(sayable_relations(base, a, b)), set(sayable_relations(twin, a, b))
    return bool(before - after) and bool(after - before)


def make_twin(rng: np.random.Generator, split: str, force_held_out: bool) -> tuple[Scene, Scene, str, tuple[int, ...]]:
    """(base, twin, kind, the things a caption must mention to tell them apart)."""
    kind = TWIN_KINDS[int(rng.integers(len(TWIN_KINDS)))]   # drawn once: a swap fails more often than a count
    while True:
        base = sample_scene(rng, split=split, force_held_out=force_held_out, min_things=2)
        if kind == "count_change":
            i = int(rng.integers(len(base.things)))
            twin = change_count(base, rng, i)
            if twin is not None:
                return base, twin, kind, (i,)
            continue
        pairs = [(i, j) for i in range(len(base.things)) for j in range(len(base.things))
                 if i < j and (base.things[i].category, base.things[i].colour)
                 != (base.things[j].category, base.things[j].colour)]
        for k in rng.permutation(len(pairs)):
            i, j = pairs[int(k)]
            twin = swap_positions(base, i, j)
            if twin is not None and _swap_changes(base, twin, i, j):
                return base, twin, kind, (i, j)


def _about_in(scene: Scene, about: tuple[int, ...], like: Scene) -> tuple[int, ...]:
    """`about` for `scene`, whose things are those of `like` (a thing may have gone at the end of its list)."""
    if scene is like or len(about) > 1:   # a position swap keeps every index
        return about
    t = like.things[about[0]]
    return (next(k for k, u in enumerate(scene.things) if (u.category, u.colour) == (t.category, t.colour)),)


@lru_cache(maxsize=16)
def _pair(seed: int, split: str, pair: int, twin_fraction: float) -> tuple[Scene, Scene, str, tuple[int, ...]] | None:
    """A twin pair of images 2*pair and 2*pair+1, or None for two independent images."""
    rng = _rng(seed, split, pair, 2)
    if rng.random() >= twin_fraction:
        return None
    return make_twin(rng, split, split in HELD_OUT and rng.random() < HELD_OUT_P)


def _captions(scene: Scene, rng: np.random.Generator, n: int, split: str, twin: Scene | None,
              about: tuple[int, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, str, tuple[str, ...]], ...]]:
    """n distinct true captions (false of the twin, if any), and (hard negative, its kind, the other kinds'
    negatives) for each; fewer captions only if the draws run out of distinct ones."""
    chosen: dict[str, tuple] = {}
    for _ in range(CAPTION_TRIES * n):
        if len(chosen) == n:
            break
        parts, wording = describe(scene, rng, split=split, about=about if twin is not None else ())
        if twin is None or not caption_matches(twin, parts):
            chosen.setdefault(render_caption(parts, wording), (parts, wording))
    return tuple(chosen), tuple(hard_negatives(scene, p, w, rng, split=split) for p, w in chosen.values())


def _sample(split: str, i: int, n_images: int, seed: int, image_size: int, captions_per_image: int,
            twin_fraction: float) -> Sample:
    rng = _rng(seed, split, i, 1)
    render_seed = int(rng.integers(2**32))
    pair = _pair(seed, split, i // 2, twin_fraction) if twin_fraction > 0 else None
    twin = twin_id = twin_kind = None
    about: tuple[int, ...] = ()
    if pair is not None and (i ^ 1) < n_images:
        scene, twin = pair[i % 2], pair[1 - i % 2]
        twin_id, twin_kind, about = _image_id(split, i ^ 1), pair[2], _about_in(scene, pair[3], pair[0])
    else:
        scene = pair[i % 2] if pair is not None else sample_scene(
            rng, split=split, force_held_out=split in HELD_OUT and rng.random() < HELD_OUT_P)
    caps, negs = _captions(scene, rng, captions_per_image, split, twin, about)
    held = split in HELD_OUT and scene.held_out(HELD_OUT[split])
    return Sample(_image_id(split, i), scene, caps, tuple(n[0] for n in negs), tuple(n[1] for n in negs),
                  tuple(n[2] for n in negs), held, split, render_seed, image_size, twin_id, twin_kind)


def _image_id(split: str, i: int) -> str:
    return f"{split}_{i:06d}"


def generate_split(split: str, n_images: int, seed: int, *, image_size: int = 160, captions_per_image: int = 5,
                   start: int = 0, stop: int | None = None, twin_fraction: float | None = None) -> list[Sample]:
    """Samples of one split; the same arguments always give the same samples and pixels.

    `start`/`stop` select a slice of the split's `n_images` samples without making the rest.
    `twin_fraction` is the share of image pairs that are confusable twins: TWIN_FRACTION for the
    test split (which always has it), 0 for train and val unless given.

    >>> s = generate_split("test", 2, seed=0)
    >>> len(s), s[0].render().size
    (2, (160, 160))
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if split == "test" and twin_fraction not in (None, TWIN_FRACTION):
        raise ValueError(f"the test split's twins are fixed at {TWIN_FRACTION}; twin_fraction applies to train and val")
    fraction = TWIN_FRACTION if split == "test" else twin_fraction or 0.0
    stop = n_images if stop is None else min(stop, n_images)
    return [_sample(split, i, n_images, seed, image_size, captions_per_image, fraction) for i in range(start, stop)]

