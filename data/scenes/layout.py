"""Sampling scenes of the photo-like world, and their confusable twins.

Things of one category and colour come in groups ("three red balls"). Standing things stand on
the ground band of their place, nearer ones lower and larger; flying things fill the sky, hanging
ones the wall. Some things are put beside or partly in front of one already there, since random
boxes are rarely close. Every layout keeps apart what the relations need kept apart: boxes either
all but miss each other or overlap clearly, with the front one standing clearly lower, and a
thing is never just too far to be "next to" another (world.py's margins).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from .glyphs import aspect
from .world import (
    AIR,
    CATEGORIES,
    HELD_OUT,
    NEXT_GAP,
    OVERLAP,
    PLACES,
    TOUCH,
    WALL,
    WATER,
    Box,
    Category,
    Place,
    Scene,
    Thing,
    box_for,
    category_places,
    forbidden,
    overlap,
)

COUNT_P = (0.62, 0.24, 0.1, 0.04)   # one to four things in a group
GROUPS_P = (0.2, 0.55, 0.25)        # one to three groups in a scene
MAX_THINGS = 6
SAME_CATEGORY_P = 0.3   # a further group is another colour of a coloured category there: binding swaps need it
TINTED_P = 0.75         # a group of a category with plain and coloured looks is coloured
NEAR_P = 0.45           # a standing thing is put beside, or partly in front of or behind, one already there
MAX_TILT = 15.0         # degrees; things taller than TALL lean a third of it
TALL = 0.2
MARGIN = 0.01           # boxes stay this far inside the frame
MAX_SIDE = 0.48         # the longest side of a box
DEPTH_STEP = 0.03       # of two overlapping things, the front one stands at least this much lower
MAX_HIDDEN = 0.3        # at most this share of a thing is behind another
NOT_NEXT = 1.0          # a horizontal gap between NEXT_GAP and this share of the narrower width is never made
TRIES = 60
COLOURED_WEIGHT = 2.5   # coloured categories are drawn this much more often: colour is a thing people search by
SCALE = 1.2             # of every category's height: things large enough to read at 160 px
MIN_HEIGHT = 0.13       # and never smaller than this (about 21 px at 160)

T = TypeVar("T")


def _pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    return items[int(rng.integers(len(items)))]


def _draw(rng: np.random.Generator, p: Sequence[float]) -> int:
    return 1 + int(np.searchsorted(np.cumsum(p), rng.random() * sum(p)))


@dataclass(frozen=True)
class Group:
    category: str
    colour: str | None
    count: int


def _colour(rng: np.random.Generator, category: str, split: str, exclude: Sequence[str] = ()) -> str | None:
    cat, banned = CATEGORIES[category], forbidden(split).colours
    if not cat.tinted or (cat.looks and rng.random() >= TINTED_P):
        return None
    options = [c for c in cat.colours if c not in exclude and (category, c) not in banned]
    return _pick(rng, options) if options else None


def _first(rng: np.random.Generator, split: str, force_held_out: bool) -> tuple[str, list[Group]]:
    """The place, and a first group holding one of the split's held-out pairs when forced."""
    if not force_held_out or split not in HELD_OUT:
        return _pick(rng, list(PLACES)), []
    held, banned = HELD_OUT[split], forbidden(split).places
    pairs = sorted([("colour", *p) for p in held.colours] + [("place", *p) for p in held.places])
    what, category, value = _pick(rng, pairs)
    if what == "colour":
        place = _pick(rng, [p for p in category_places(category) if (category, p) not in banned])
        return place, [Group(category, value, _draw(rng, COUNT_P))]
    colour = _colour(rng, category, split)
    return value, [Group(category, colour, _draw(rng, COUNT_P))]


def _next_group(rng: np.random.Generator, place: str, groups: list[Group], split: str) -> Group:
    coloured = [g for g in groups if g.colour is not None]
    if coloured and rng.random() < SAME_CATEGORY_P:
        category = _pick(rng, coloured).category
        colour = _colour(rng, category, split, exclude=[g.colour for g in coloured if g.category == category])
        if colour is not None and CATEGORIES[category].tinted:
            return Group(category, colour, _draw(rng, COUNT_P))
    used, banned = {g.category for g in groups}, forbidden(split).places
    options = [c for c in CATEGORIES if c not in used and place in category_places(c) and (c, place) not in banned]
    weights = np.array([COLOURED_WEIGHT if CATEGORIES[c].colours else 1.0 for c in options])
    category = options[int(rng.choice(len(options), p=weights / weights.sum()))]
    return Group(category, _colour(rng, category, split), _draw(rng, COUNT_P))


def sample_groups(rng: np.random.Generator, split: str = "train",
                  force_held_out: bool = False) -> tuple[str, list[Group]]:
    """A place and the groups of things in it (no pair held out from `split`)."""
    place, groups = _first(rng, split, force_held_out)
    n_groups = _draw(rng, GROUPS_P)
    while len(groups) < n_groups and sum(g.count for g in groups) < MAX_THINGS:
        g = _next_group(rng, place, groups, split)
        groups.append(replace(g, count=min(g.count, MAX_THINGS - sum(h.count for h in groups))))
    return place, groups


# ---------------------------------------------------------------- where things go

def _band(place: Place, kind: str) -> tuple[float, float]:
    """Range of bottoms (standing, floating things) or centres (flying, hanging things)."""
    if kind in (AIR, WALL):
        return place.sky
    if kind == WATER:
        assert place.water is not None
        return place.water
    return place.ground


def _height(rng: np.random.Generator, place: Place, cat: Category, y: float) -> float:
    if cat.kind in (AIR, WALL):
        scale = rng.uniform(0.75, 1.0)
    else:
        lo, hi = _band(place, cat.kind)
        scale = 0.62 + 0.38 * (y - lo) / (hi - lo)    # perspective: nearer things stand lower, larger
    return max(MIN_HEIGHT, cat.height * SCALE * scale * rng.uniform(0.92, 1.08))


def _sized_box(rng: np.random.Generator, place: Place, cat: Category, look: str, cx: float | None,
               y: float) -> Box:
    """A box of `cat` at band position y; centred at cx, or anywhere across when cx is None."""
    h = _height(rng, place, cat, y)
    h = min(h, MAX_SIDE, MAX_SIDE / aspect(look))
    bottom = y + h / 2 if cat.kind in (AIR, WALL) else y
    w = h * aspect(look)
    if cx is None:
        cx = rng.uniform(w / 2 + MARGIN, max(w / 2 + MARGIN, 1 - w / 2 - MARGIN))
    return box_for(look, cx, bottom, h)


def _near(rng: np.random.Generator, place: Place, cat: Category, look: str, target: Thing) -> Box:
    """A box beside `target` at its depth, or partly in front of or behind it."""
    lo, hi = _band(place, cat.kind)
    side = 1 if rng.random() < 0.5 else -1
    beside = rng.random() < 0.5
    shift = rng.uniform(-0.02, 0.02) if beside else _pick(rng, (-1, 1)) * rng.uniform(0.05, 0.14)
    bottom = float(np.clip(target.box[3] + shift, lo, hi))
    box = _sized_box(rng, place, cat, look, 0.5, bottom)
    w = box[2] - box[0]
    if beside:
        dx = target.w / 2 + rng.uniform(0.0, 0.35) * min(w, target.w) + w / 2
    else:
        dx = (target.w + w) / 2 * rng.uniform(0.35, 0.7)
    return (box[0] - 0.5 + target.cx + side * dx, box[1], box[2] - 0.5 + target.cx + side * dx, box[3])


def _propose(rng: np.random.Generator, place: Place, category: str, colour: str | None,
             placed: list[Thing]) -> Thing:
    cat = CATEGORIES[category]
    look = _pick(rng, [c for c, _ in cat.tinted] if colour else cat.looks)
    near = [t for t in placed if CATEGORIES[t.category].kind == cat.kind and cat.kind not in (AIR, WALL)]
    if near and rng.random() < NEAR_P:
        box = _near(rng, place, cat, look, _pick(rng, near))
    else:
        box = _sized_box(rng, place, cat, look, None, rng.uniform(*_band(place, cat.kind)))
    tilt = MAX_TILT if cat.height <= TALL else MAX_TILT / 3
    return Thing(category, look, colour, box, 0, float(rng.uniform(-tilt, tilt)), bool(rng.random() < 0.5))


def _pair_ok(a: Thing, b: Thing) -> bool:
    share = overlap(a, b)
    if share <= TOUCH:
        gap = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
        shared_height = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
        near_miss = NEXT_GAP * min(a.w, b.w) < gap <= NOT_NEXT * min(a.w, b.w)
        return not (near_miss and shared_height >= 0.5 * min(a.h, b.h))
    if share < OVERLAP:
        return False
    front, back = (a, b) if a.box[3] > b.box[3] else (b, a)
    return front.box[3] - back.box[3] >= DEPTH_STEP and share * min(a.area, b.area) <= MAX_HIDDEN * back.area


def fits(thing: Thing, others: Sequence[Thing]) -> bool:
    """Is `thing` inside the frame, clear of or clearly overlapping each of `others`, and hiding or hidden by
    at most one of them?"""
    x0, y0, x1, y1 = thing.box
    if x0 < MARGIN or y0 < MARGIN or x1 > 1 - MARGIN or y1 > 1 - MARGIN:
        return False
    if not all(_pair_ok(thing, o) for o in others):
        return False
    return sum(overlap(thing, o) > TOUCH for o in others) <= 1 and all(
        sum(overlap(o, p) > TOUCH for p in [*others, thing] if p is not o) <= 1 for o in others)


def with_depth(things: Sequence[Thing]) -> tuple[Thing, ...]:
    """`things` with z set: the lower a thing stands, the nearer it is, as in a photo."""
    order = sorted(range(len(things)), key=lambda k: (things[k].box[3], k))
    z = {k: rank for rank, k in enumerate(order)}
    return tuple(replace(t, z=z[k]) for k, t in enumerate(things))


def layout(rng: np.random.Generator, place: str, groups: Sequence[Group]) -> tuple[Thing, ...] | None:
    """Things for `groups` in `place`, or None when they do not fit."""
    specs = [(g.category, g.colour) for g in groups for _ in range(g.count)]
    specs.sort(key=lambda s: -CATEGORIES[s[0]].height)   # the largest first: they are the hardest to fit
    placed: list[Thing] = []
    for category, colour in specs:
        for _ in range(TRIES):
            thing = _propose(rng, PLACES[place], category, colour, placed)
            if fits(thing, placed):
                placed.append(thing)
                break
        else:
            return None
    order = rng.permutation(len(placed))   # so that the order of things says nothing of their sizes
    return with_depth([placed[int(k)] for k in order])


def sample_scene(rng: np.random.Generator, *, split: str = "train", force_held_out: bool = False,
                 min_things: int = 1) -> Scene:
    """A random scene with nothing held out from `split`.

    >>> scene = sample_scene(np.random.default_rng(0))
    >>> 1 <= len(scene.things) <= MAX_THINGS
    True
    """
    while True:
        place, groups = sample_groups(rng, split, force_held_out)
        if sum(g.count for g in groups) < min_things:
            continue
        things = layout(rng, place, groups)
        if things is not None:
            return Scene(place, things)


# ---------------------------------------------------------------- twins

TWIN_KINDS: tuple[str, ...] = ("position_swap", "count_change")


def _valid(things: Sequence[Thing]) -> bool:
    return all(fits(t, [u for u in things if u is not t]) for t in things)


def _moved(t: Thing, to: Thing) -> Thing:
    """`t` at the place of `to`: its bottom centre, or its centre for things that fly or hang."""
    dx = to.cx - t.cx
    dy = to.cy - t.cy if CATEGORIES[t.category].kind in (AIR, WALL) else to.box[3] - t.box[3]
    x0, y0, x1, y1 = t.box
    return replace(t, box=(x0 + dx, y0 + dy, x1 + dx, y1 + dy))


def swap_positions(scene: Scene, i: int, j: int) -> Scene | None:
    """The scene with things i and j in each other's places (None if the layout then breaks its rules)."""
    a, b = scene.things[i], scene.things[j]
    if CATEGORIES[a.category].kind != CATEGORIES[b.category].kind:
        return None
    things = list(scene.things)
    things[i], things[j] = _moved(a, b), _moved(b, a)
    return Scene(scene.place, with_depth(things)) if _valid(things) else None


def change_count(scene: Scene, rng: np.random.Generator, i: int) -> Scene | None:
    """The scene with one thing more or fewer like thing i (same category and colour); None if none fits."""
    t = scene.things[i]
    same = [k for k, u in enumerate(scene.things) if (u.category, u.colour) == (t.category, t.colour)]
    if len(same) > 1 and (len(same) == len(COUNT_P) or rng.random() < 0.5):
        drop = _pick(rng, same)
        return Scene(scene.place, with_depth([u for k, u in enumerate(scene.things) if k != drop]))
    if len(same) == len(COUNT_P) or len(scene.things) >= MAX_THINGS:
        return None
    for _ in range(TRIES):
        new = _propose(rng, PLACES[scene.place], t.category, t.colour, list(scene.things))
        if fits(new, scene.things):
            return Scene(scene.place, with_depth([*scene.things, new]))
    return None
