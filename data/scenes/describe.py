"""True captions of a scene, and false captions worded like them (hard negatives).

A negative changes one part of a true caption's meaning: a category, a colour, a count, the
relation (flipped), the place, or which mention has which colour (a binding swap). Each is
checked false with `caption_matches` before it is returned, and none names a pair held out
from the split it is made for.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from .captions import (
    CaptionParts,
    Mention,
    Wording,
    caption_matches,
    members,
    relations_between,
    render_caption,
    templates_for,
    uses,
)
from .world import (
    CATEGORIES,
    GROUND,
    OPPOSITE,
    PLACES,
    WATER,
    Scene,
    category_places,
    forbidden,
)

P_TWO = 0.8         # a caption names two groups, when the scene has two
P_COLOUR = 0.7      # a coloured group is named with its colour
P_RELATION = 0.85   # two named groups are related (else "a and b"), when some relation holds
P_PLACE = 0.5       # a caption says the place
PHRASE_PICK = 6     # phrase indices are drawn below this multiple of every phrase list's length: all equally likely
# Rarer relations are said more often when they hold, so that each is common enough to learn.
RELATION_WEIGHT = {"left": 1.0, "right": 1.0, "above": 1.5, "below": 1.5, "next_to": 3.0, "in_front": 3.0,
                   "behind": 3.0}


def _mention(scene: Scene, i: int, say_colour: bool) -> Mention:
    """A mention of thing i: its category, and its colour when said (or needed to keep the count at most 4)."""
    t = scene.things[i]
    plain = Mention(t.category)
    if t.colour is not None and (say_colour or len(members(scene, plain)) > 4):
        coloured = Mention(t.category, 1, t.colour)
        return replace(coloured, count=len(members(scene, coloured)))
    return replace(plain, count=len(members(scene, plain)))


def _second(scene: Scene, m1: Mention, rng: np.random.Generator, j: int | None) -> Mention | None:
    """A mention of another group than m1's (of thing j, if given); None when there is none."""
    things = scene.things
    taken = set(members(scene, m1))
    if j is None:
        options = [k for k, t in enumerate(things) if k not in taken and (t.category != m1.category or (
            m1.colour is not None and t.colour is not None))]
        if not options:
            return None
        j = options[int(rng.integers(len(options)))]
    same = things[j].category == m1.category   # then both must say their colours
    m2 = _mention(scene, j, same or rng.random() < P_COLOUR)
    return None if set(members(scene, m2)) & taken else m2


def sayable_relations(scene: Scene, a: list[int], b: list[int]) -> tuple[str, ...]:
    """The relations between things a and b that a caption says: not above or below between things that all
    stand (a photo's caption says one is behind the other, or farther off, where their boxes say higher)."""
    options = relations_between(scene, a, b)
    if all(CATEGORIES[scene.things[k].category].kind in (GROUND, WATER) for k in a + b):
        return tuple(r for r in options if r not in ("above", "below"))
    return options


def _wording(parts: CaptionParts, rng: np.random.Generator, split: str) -> Wording:
    banned = forbidden(split).wordings
    templates = [t for t in templates_for(parts) if t not in banned]
    phrase, place = (int(k) for k in rng.integers(PHRASE_PICK, size=2))
    return Wording(templates[int(rng.integers(len(templates)))], phrase, place)


def describe(scene: Scene, rng: np.random.Generator, *, split: str = "train",
             about: Sequence[int] = ()) -> tuple[CaptionParts, Wording]:
    """A random true caption of `scene` and its wording (none held out from `split`).

    `about` names things the caption must mention first (one, or two that it then relates where it
    can): what a confusable twin changed.
    """
    i = about[0] if about else int(rng.integers(len(scene.things)))
    m1 = _mention(scene, i, rng.random() < P_COLOUR or (len(about) > 1 and scene.things[about[1]].category
                                                          == scene.things[i].category))
    m2 = None
    if len(about) > 1 or rng.random() < P_TWO:
        m2 = _second(scene, m1, rng, about[1] if len(about) > 1 else None)
    relation = None
    if m2 is not None and (len(about) > 1 or rng.random() < P_RELATION):
        options = sayable_relations(scene, members(scene, m1), members(scene, m2))
        if options:
            w = np.array([RELATION_WEIGHT[r] for r in options])
            relation = options[int(rng.choice(len(options), p=w / w.sum()))]
    place = scene.place if rng.random() < P_PLACE else None
    parts = CaptionParts((m1,) if m2 is None else (m1, m2), relation, place)
    return parts, _wording(parts, rng, split)


# ---------------------------------------------------------------- negatives

NEGATIVE_KINDS: tuple[str, ...] = ("category_change", "colour_change", "count_change", "relation_flip",
                                   "place_change", "colour_swap")
NEGATIVE_WEIGHT = {"colour_swap": 3.0, "relation_flip": 3.0, "count_change": 2.0, "colour_change": 2.0,
                   "category_change": 1.0, "place_change": 1.0}
Edit = Callable[[Scene, CaptionParts, np.random.Generator], "CaptionParts | None"]


def _set(parts: CaptionParts, i: int, **change: object) -> CaptionParts:
    ms = list(parts.mentions)
    ms[i] = replace(ms[i], **change)  # type: ignore[arg-type]
    return replace(parts, mentions=tuple(ms))


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))] if items else None


def _category_change(scene: Scene, parts: CaptionParts, rng: np.random.Generator) -> CaptionParts | None:
    i = int(rng.integers(len(parts.mentions)))
    m, present = parts.mentions[i], {t.category for t in scene.things}
    fit = [c for c, cat in CATEGORIES.items() if c not in present and (m.colour is None or m.colour in cat.colours)]
    likely = [c for c in fit if scene.place in category_places(c)]   # things that could be there look harder
    new = _pick(rng, likely or fit)
    return None if new is None else _set(parts, i, category=new)


def _colour_change(scene: Scene, parts: CaptionParts, rng: np.random.Generator) -> CaptionParts | None:
    options = [k for k, m in enumerate(parts.mentions) if CATEGORIES[m.category].colours]
    i = _pick(rng, options)
    if i is None:
        return None
    m = parts.mentions[i]
    return _set(parts, i, colour=_pick(rng, [c for c in CATEGORIES[m.category].colours if c != m.colour]))


def _count_change(scene: Scene, parts: CaptionParts, rng: np.random.Generator) -> CaptionParts | None:
    i = int(rng.integers(len(parts.mentions)))
    n = parts.mentions[i].count
    return _set(parts, i, count=_pick(rng, [c for c in (n - 1, n + 1) if 1 <= c <= 4]))


def _relation_flip(scene: Scene, parts: CaptionParts, rng: np.random.Generator) -> CaptionParts | None:
    if parts.relation is None:
        return None
    if parts.relation in OPPOSITE:
        return replace(parts, relation=OPPOSITE[parts.relation])
    a, b = (members(scene, m) for m in parts.mentions)     # next to: say the side it is not on
    left = all(scene.things[i].cx < scene.things[j].cx for i in a for j in b)
    return replace(parts, relation="right" if left else "left")


def _place_change(scene: Scene, parts: CaptionParts, rng: np.random.Generator) -> CaptionParts | None:
    others = [p for p in PLACES if p != scene.place]
    likely = [p for p in others if all(p in category_places(m.category) for m in parts.mentions)]
    return replace(parts, place=_pick(rng, likely or others))


def _colour_swap(scene: Scene, parts: CaptionParts, rng: np.random.Generator) -> CaptionParts | None:
    if len(parts.mentions) < 2:
        return None
    a, b = parts.mentions
    if a.colour is None or b.colour is None or a.colour == b.colour:
        return None
    return replace(parts, mentions=(replace(a, colour=b.colour), replace(b, colour=a.colour)))


_EDITS: dict[str, Edit] = {"category_change": _category_change, "colour_change": _colour_change,
                           "count_change": _count_change, "relation_flip": _relation_flip,
                           "place_change": _place_change, "colour_swap": _colour_swap}


def negatives(scene: Scene, parts: CaptionParts, rng: np.random.Generator, *,
              split: str = "train", tries: int = 3) -> dict[str, CaptionParts]:
    """One false edit of a true caption per kind of NEGATIVE_KINDS that yields one (kind -> meaning)."""
    banned = forbidden(split)
    out = {}
    for kind, edit in _EDITS.items():
        for _ in range(tries):
            cand = edit(scene, parts, rng)
            if cand is not None and not caption_matches(scene, cand) and not uses(cand, banned):
                out[kind] = cand
                break
    return out


def hard_negatives(scene: Scene, parts: CaptionParts, wording: Wording, rng: np.random.Generator, *,
                   split: str = "train") -> tuple[str, str, tuple[str, ...]]:
    """(text, kind) of one false caption worded like the true one, drawn by NEGATIVE_WEIGHT, and the texts of
    the other kinds' false captions.

    >>> from itm.data.scenes import Scene, Thing, parse_caption
    >>> scene = Scene("beach", (Thing("dog", "1f415", None, (0.1, 0.6, 0.3, 0.85)),))
    >>> text, kind, more = hard_negatives(scene, CaptionParts((Mention("dog"),), None, "beach"), Wording(),
    ...                                   np.random.default_rng(0))
    >>> caption_matches(scene, parse_caption(text))
    False
    """
    cands = negatives(scene, parts, rng, split=split)
    kinds = list(cands)
    w = np.array([NEGATIVE_WEIGHT[k] for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
    texts = {k: render_caption(p, wording) for k, p in cands.items()}
    more = tuple(dict.fromkeys(t for k, t in texts.items() if k != kind and t != texts[kind]))
    return texts[kind], kind, more
