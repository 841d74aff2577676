"""Caption grammar, parser, truth checker and hard negatives of the photo-like world.

A caption's meaning (`CaptionParts`: one or two mentions, a relation between them, a place) is
kept apart from its wording (`Wording`: template and phrase choices). `render_caption` writes a
meaning in any wording, `parse_caption` reads every wording back to the same meaning, and
`caption_matches` decides truth from the meaning and the scene alone, so any caption can be
checked against any scene without trusting the code that wrote it.

Counts are exact: a mention names every thing of its category (and colour, when one is said),
so "two dogs" is false of a scene with three dogs, and "a ball" of a scene with two balls.
A relation holds between two mentions when it holds between each of their things.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .world import CATEGORIES, COLOURS, PLACES, RELATIONS, HeldOut, Scene, holds

NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "next_to": ("next to", "beside"),
    "in_front": ("in front of",),
    "behind": ("behind",),
}
PLACE_PHRASES: dict[str, tuple[str, ...]] = {     # after the things: "a dog on the beach"
    "beach": ("on a beach", "on the beach", "at the beach"),
    "snow": ("in the snow", "in snow", "on the snow"),
    "field": ("in a field", "on the grass", "in a grassy field"),
    "road": ("on a road", "on the street", "on the road"),
    "lake": ("by a lake", "at the lake", "by the lake"),
    "forest": ("in a forest", "in the woods", "in the forest"),
    "room": ("in a room", "indoors", "inside a room"),
    "night": ("at night", "under the night sky"),
    "desert": ("in a desert", "in the desert"),
}
PLACE_NOUNS: dict[str, tuple[str, ...]] = {       # before them: "a beach with a dog"
    "beach": ("a beach",), "snow": ("a snowy landscape", "snowy ground"), "field": ("a field", "a grassy field"),
    "road": ("a road", "a street"), "lake": ("a lake", "a lakeside"), "forest": ("a forest", "the woods"),
    "room": ("a room",), "night": ("a night sky", "a night scene"), "desert": ("a desert",),
}
# Templates: {a}, {b} the mentions, {rel} the relation, {p} the place phrase, {pn} the place noun.
TEMPLATES: dict[str, str] = {
    "plain": "{a} {rel} {b}{p}",            # also "{a}{p}" and "{a} and {b}{p}"
    "is": "{a} {is} {rel} {b}{p}",
    "there": "there {is} {a} {rel} {b}{p}",
    "photo": "a photo of {a} {rel} {b}{p}",
    "with_it": "{b} with {a} {rel} {it}{p}",
    "place_first": "{pn} with {a} {rel} {b}",
}
_NEEDS_RELATION = frozenset({"is", "with_it"})
_NEEDS_PLACE = frozenset({"place_first"})


@dataclass(frozen=True)
class Mention:
    """A noun phrase: a category, how many of it, and its colour when one is said."""

    category: str
    count: int = 1
    colour: str | None = None


@dataclass(frozen=True)
class CaptionParts:
    """What a caption says: one or two mentions, how the first stands to the second, and where."""

    mentions: tuple[Mention, ...]
    relation: str | None = None       # of mentions[0] with respect to mentions[1]
    place: str | None = None


@dataclass(frozen=True)
class Wording:
    """How a caption says it; none of this changes the meaning."""

    template: str = "plain"
    relation: int = 0     # which of the relation's phrases (modulo their number)
    place: int = 0        # which of the place's phrases, or nouns for "place_first" (modulo their number)


# ---------------------------------------------------------------- rendering

def noun_phrase(m: Mention) -> str:
    cat = CATEGORIES[m.category]
    head = " ".join(w for w in (m.colour, cat.plural if m.count > 1 else cat.name) if w)
    article = ("an" if head[0] in "aeiou" else "a") if m.count == 1 else NUMBERS[m.count]
    return f"{article} {head}"


def templates_for(parts: CaptionParts) -> tuple[str, ...]:
    """The templates that can say `parts`."""
    return tuple(t for t in TEMPLATES if (parts.relation is not None or t not in _NEEDS_RELATION)
                 and (parts.place is not None or t not in _NEEDS_PLACE))


def wordings(parts: CaptionParts) -> tuple[Wording, ...]:
    """Every wording of `parts`."""
    n_rel = len(RELATION_PHRASES[parts.relation]) if parts.relation else 1
    out = []
    for t in templates_for(parts):
        n_place = len((PLACE_NOUNS if t == "place_first" else PLACE_PHRASES)[parts.place]) if parts.place else 1
        out += [Wording(t, r, p) for r in range(n_rel) for p in range(n_place)]
    return tuple(out)


def render_caption(parts: CaptionParts, wording: Wording = Wording()) -> str:
    """The caption text of `parts` in `wording`.

    >>> parts = CaptionParts((Mention("dog", 2), Mention("car", 1, "red")), "left", "beach")
    >>> render_caption(parts)
    'two dogs to the left of a red car on a beach'
    >>> render_caption(parts, Wording("with_it", relation=1, place=1))
    'a red car with two dogs left of it on the beach'
    """
    if wording.template not in templates_for(parts):
        raise ValueError(f"template {wording.template!r} cannot say {parts}")
    ms = parts.mentions
    a, b = noun_phrase(ms[0]), noun_phrase(ms[1]) if len(ms) > 1 else ""
    p = f" {_nth(PLACE_PHRASES[parts.place], wording.place)}" if parts.place else ""
    fields = {"a": a, "b": b, "p": p, "is": "is" if ms[0].count == 1 else "are",
              "it": "it" if len(ms) < 2 or ms[1].count == 1 else "them",
              "pn": _nth(PLACE_NOUNS[parts.place], wording.place) if parts.place else ""}
    template = TEMPLATES[wording.template]
    if parts.relation is None:   # "{a} {rel} {b}" becomes "{a} and {b}", or "{a}" alone
        template = template.replace(" {rel} {b}", " and {b}" if len(ms) > 1 else "")
    else:
        fields["rel"] = _nth(RELATION_PHRASES[parts.relation], wording.relation)
    return template.format(**fields)


def _nth(options: tuple[str, ...], k: int) -> str:
    return options[k % len(options)]


# ---------------------------------------------------------------- parsing

def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _find(tokens: list[str], phrase: str, start: int = 0) -> int:
    """Index of the first occurrence of `phrase`'s tokens in `tokens` from `start`, or -1."""
    words = phrase.split()
    for k in range(start, len(tokens) - len(words) + 1):
        if tokens[k:k + len(words)] == words:
            return k
    return -1


def _by_length(table: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(phrase, key) for every phrase of `table`, longest first, so that no phrase is read as a part of another."""
    return sorted(((p, key) for key, ps in table.items() for p in ps), key=lambda pk: -len(pk[0].split()))


_PLACE_WORDS = _by_length({k: PLACE_PHRASES[k] + PLACE_NOUNS[k] for k in PLACES})
_RELATION_WORDS = _by_length(RELATION_PHRASES)
_NOUNS = _by_length({c.name: (c.name, c.plural) for c in CATEGORIES.values()})


def _take_place(tokens: list[str]) -> tuple[str | None, list[str]]:
    for phrase, place in _PLACE_WORDS:
        k = _find(tokens, phrase)
        if k >= 0:   # blank it out: "under the night sky" holds no relation
            return place, tokens[:k] + ["|"] * len(phrase.split()) + tokens[k + len(phrase.split()):]
    return None, tokens


def _mentions(tokens: list[str]) -> list[tuple[int, int, Mention]]:
    """(first token, end token, mention) of each noun phrase, in order."""
    found, k = [], 0
    while k < len(tokens):
        match = next(((p, c) for p, c in _NOUNS if tokens[k:k + len(p.split())] == p.split()), None)
        if match is None:
            k += 1
            continue
        end, start = k + len(match[0].split()), k
        colour = tokens[k - 1] if k > 0 and tokens[k - 1] in COLOURS else None
        start -= colour is not None
        if start == 0 or tokens[start - 1] not in _COUNT_WORDS:
            raise ValueError(f"no number before {' '.join(tokens[start:end])!r}")
        found.append((start - 1, end, Mention(match[1], _COUNT_WORDS[tokens[start - 1]], colour)))
        k = end
    return found


def _relation(tokens: list[str]) -> str | None:
    return next((rel for phrase, rel in _RELATION_WORDS if _find(tokens, phrase) >= 0), None)


def parse_caption(text: str) -> CaptionParts:
    """The meaning of a caption written by this grammar, in any wording.

    >>> parse_caption("a red car with two dogs left of it on the beach") == parse_caption(
    ...     "two dogs to the left of a red car on a beach")
    True
    """
    place, tokens = _take_place(_tokens(text))
    found = _mentions(tokens)
    if not 1 <= len(found) <= 2:
        raise ValueError(f"expected one or two things in caption {text!r}")
    if len(found) == 1:
        return CaptionParts((found[0][2],), None, place)
    after = tokens[found[1][1]:]
    if "it" in after or "them" in after:           # "{b} with {a} {rel} it": the second named is the subject
        rel = _relation(after[:max(after.index(w) for w in ("it", "them") if w in after)])
        return CaptionParts((found[1][2], found[0][2]), rel, place)
    return CaptionParts((found[0][2], found[1][2]), _relation(tokens[found[0][1]:found[1][0]]), place)


# ---------------------------------------------------------------- truth

def members(scene: Scene, m: Mention) -> list[int]:
    """Indices of the things a mention names: its category, in its colour when one is said."""
    return [k for k, t in enumerate(scene.things)
            if t.category == m.category and (m.colour is None or t.colour == m.colour)]


def _related(scene: Scene, relation: str, a: Sequence[int], b: Sequence[int]) -> bool:
    return all(holds(relation, scene.things[i], scene.things[j]) for i in a for j in b)


def caption_matches(scene: Scene, parts: CaptionParts) -> bool:
    """Is the caption true of the scene: the place, each mention's exact count, and the relation for every pair?"""
    if parts.place is not None and parts.place != scene.place:
        return False
    groups = [members(scene, m) for m in parts.mentions]
    if any(len(g) != m.count for g, m in zip(groups, parts.mentions)):
        return False
    if len(groups) == 2 and set(groups[0]) & set(groups[1]):   # one thing named twice
        return False
    return parts.relation is None or _related(scene, parts.relation, groups[0], groups[1])


CAPTION_KINDS = ("count", "relation", "colour", "place", "several", "plain")


def caption_kind(parts: CaptionParts) -> str:
    """What a caption asks of an image beyond its things: one of CAPTION_KINDS ("several": more than one)."""
    said = [kind for kind, present in (
        ("count", any(m.count > 1 for m in parts.mentions)), ("relation", parts.relation is not None),
        ("colour", any(m.colour for m in parts.mentions)), ("place", parts.place is not None)) if present]
    return "plain" if not said else said[0] if len(said) == 1 else "several"


WHY_FALSE = ("category", "colour", "count", "binding", "relation", "place", "several")


def _mention_fault(scene: Scene, m: Mention) -> str | None:
    if not any(t.category == m.category for t in scene.things):
        return "category"
    n = len(members(scene, m))
    return None if n == m.count else "colour" if n == 0 else "count"


def why_false(scene: Scene, parts: CaptionParts) -> str | None:
    """Which part of a caption fails on `scene` (one of WHY_FALSE), or None when it is true.

    "binding": the colours are there, on each other's things (swapping them makes the mentions fit);
    "relation": the things fit and the place too, but not how they stand; "several": more than one part.
    """
    if caption_matches(scene, parts):
        return None
    faults = {f for m in parts.mentions if (f := _mention_fault(scene, m))}
    if faults == {"colour"} and len(parts.mentions) == 2 and all(m.colour for m in parts.mentions):
        a, b = parts.mentions
        if all(_mention_fault(scene, m) is None for m in (replace(a, colour=b.colour), replace(b, colour=a.colour))):
            faults = {"binding"}
    if parts.place is not None and parts.place != scene.place:
        faults.add("place")
    if not faults:
        faults.add("relation")
    return faults.pop() if len(faults) == 1 else "several"


def uses(parts: CaptionParts, held: HeldOut) -> bool:
    """Does the caption name a category-colour or category-place pair of `held`?"""
    return any((m.category, m.colour) in held.colours or (m.category, parts.place) in held.places
               for m in parts.mentions)


def relations_between(scene: Scene, a: Sequence[int], b: Sequence[int]) -> tuple[str, ...]:
    """Every relation that holds between each thing of `a` and each of `b`."""
    return tuple(r for r in RELATIONS if _related(scene, r, a, b))

