"""Vocabulary and scene model of the synthetic image-caption world.

A scene is a plain background with 1-3 objects on a 3x3 grid. Within one scene
every object has its own colour, its own shape and its own cell, so a caption
that names a colour and a shape picks out at most one object. That is what makes
binding swaps ("red circle, blue square" -> "blue circle, red square") false by
construction rather than by luck.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "green": (35, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 35),
    "purple": (135, 55, 190),
    "orange": (245, 135, 25),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "star", "cross", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
ROW_NAMES: tuple[str, ...] = ("top", "middle", "bottom")
COL_NAMES: tuple[str, ...] = ("left", "centre", "right")
GRID = 3

# Mid-range tones, light and dark, so that white and black objects still stand out.
BACKGROUNDS: dict[str, RGB] = {
    "pale_grey": (196, 196, 196),
    "sand": (204, 188, 156),
    "mist": (178, 190, 202),
    "slate": (84, 92, 108),
    "charcoal": (74, 74, 74),
    "umber": (94, 74, 56),
}

# Colour-shape pairs seen only in the test split (compositional generalisation).
# Each chromatic colour and each shape is held out exactly once.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("purple", "star"),
    ("orange", "square"),
    ("green", "triangle"),
    ("blue", "cross"),
    ("yellow", "circle"),
    ("red", "diamond"),
})

# Probabilities of 1, 2 and 3 objects in a scene.
OBJECT_COUNT_P: tuple[float, float, float] = (0.08, 0.80, 0.12)


@dataclass(frozen=True)
class Obj:
    """One shape in a scene; row 0 is the top, col 0 the left."""

    colour: str
    shape: str
    size: str
    row: int
    col: int

    @property
    def combo(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """Objects (distinct colours, shapes and cells) on a named background."""

    objects: tuple[Obj, ...]
    background: str

    @property
    def has_held_out(self) -> bool:
        return any(o.combo in HELD_OUT for o in self.objects)


def relations(a: Obj, b: Obj) -> tuple[str, ...]:
    """Relations that hold of `a` with respect to `b` ("left" = a is left of b)."""
    out = []
    if a.col < b.col:
        out.append("left")
    if a.col > b.col:
        out.append("right")
    if a.row < b.row:
        out.append("above")
    if a.row > b.row:
        out.append("below")
    return tuple(out)


def holds(relation: str, a: Obj, b: Obj) -> bool:
    return relation in relations(a, b)


OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}


T = TypeVar("T")


def _pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    return items[int(rng.integers(len(items)))]


def sample_scene(
    rng: np.random.Generator,
    *,
    n_objects: int | None = None,
    allow_held_out: bool = True,
    force_held_out: bool = False,
) -> Scene:
    """Draw a random scene.

    >>> sample_scene(np.random.default_rng(0), n_objects=2).objects[0].shape in SHAPES
    True
    """
    if n_objects is None:
        n_objects = 1 + int(np.searchsorted(np.cumsum(OBJECT_COUNT_P), rng.random() * sum(OBJECT_COUNT_P)))
    cells = rng.permutation(GRID * GRID)[:n_objects]
    combos: list[tuple[str, str]] = []
    if force_held_out:
        combos.append(_pick(rng, sorted(HELD_OUT)))
    while len(combos) < n_objects:
        used_c = {c for c, _ in combos}
        used_s = {s for _, s in combos}
        free_c = [c for c in COLOURS if c not in used_c]
        free_s = [s for s in SHAPES if s not in used_s]
        options = [(c, s) for c in free_c for s in free_s if allow_held_out or (c, s) not in HELD_OUT]
        combos.append(_pick(rng, options))
    order = rng.permutation(n_objects)   # a forced held-out pair is not always first
    objects = tuple(
        Obj(combos[k][0], combos[k][1], _pick(rng, SIZES), int(cell) // GRID, int(cell) % GRID)
        for cell, k in zip(cells, order)
    )
    return Scene(objects, _pick(rng, list(BACKGROUNDS)))


def swap_colours(scene: Scene, i: int, j: int) -> Scene:
    """The same scene with the colours of objects i and j exchanged."""
    objs = list(scene.objects)
    a, b = objs[i], objs[j]
    objs[i], objs[j] = replace(a, colour=b.colour), replace(b, colour=a.colour)
    return replace(scene, objects=tuple(objs))


def swap_positions(scene: Scene, i: int, j: int) -> Scene:
    """The same scene with objects i and j in each other's cells."""
    objs = list(scene.objects)
    a, b = objs[i], objs[j]
    objs[i], objs[j] = replace(a, row=b.row, col=b.col), replace(b, row=a.row, col=a.col)
    return replace(scene, objects=tuple(objs))
