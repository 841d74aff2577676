"""Caption grammar, parser, truth checker and hard negatives.

A caption is built from structured parts (`CaptionParts`): what it says (the
mentioned objects, one relation or one position) and how it says it (`Surface`:
which template and wording). `caption_matches` decides truth from the meaning
alone, and `parse_caption` recovers the meaning from text, so a caption can be
checked against a scene without trusting the code that wrote it.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import permutations

import numpy as np

from .world import COL_NAMES, COLOURS, HELD_OUT, OPPOSITE, ROW_NAMES, SHAPES, SIZES, Obj, Scene, holds, relations

SINGLE_TEMPLATES = ("{a}{pos}", "there is {a}{pos}", "a picture of {a}{pos}", "an image showing {a}{pos}")
RELATION_TEMPLATES = ("{a} {rel} {b}", "{a} is {rel} {b}", "there is {a} {rel} {b}",
                      "{a} placed {rel} {b}", "an image with {a} {rel} {b}")
AND_TEMPLATES = ("{a} and {b}", "there is {a} and {b}", "{a} as well as {b}")
THIRD_JOINERS = (" and {c}", " with {c}", ", and also {c}")
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "lower than"),
}
_RELATION_WORDS = {"left": "left", "right": "right", "above": "above", "over": "above",
                   "higher": "above", "below": "below", "under": "below", "lower": "below"}

P_SIZE = 0.6          # a mention in a multi-object caption names the size
P_SINGLE_SIZE = 0.7   # ... in a one-object caption
P_POSITION = 0.5      # a one-object caption says where the object is
P_RELATION = 0.85     # a multi-object caption relates two objects (else "A and B")


@dataclass(frozen=True)
class Mention:
    """A noun phrase: colour and shape, and the size when it is said."""

    colour: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class Position:
    """Where a lone object is: a row, a column or both (None: not said)."""

    row: int | None = None
    col: int | None = None


@dataclass(frozen=True)
class Surface:
    """Wording choices that do not change the meaning."""

    template: int = 0
    phrase: int = 0            # wording of the relation or position
    size_after: bool = False   # "a red circle that is small" (one-object captions)
    joiner: int = 0            # how a third object is attached


@dataclass(frozen=True)
class CaptionParts:
    """Meaning of a caption (mentions, relation, position) plus its wording."""

    mentions: tuple[Mention, ...]
    relation: str | None = None        # mentions[0] relative to mentions[1]
    position: Position | None = None   # of mentions[0], one-object captions only
    surface: Surface = field(default_factory=Surface)

    def meaning(self) -> CaptionParts:
        return replace(self, surface=Surface())


# ---------------------------------------------------------------- rendering

def _with_article(words: list[str]) -> str:
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _noun_phrase(m: Mention, size_after: bool = False) -> str:
    if m.size is None:
        return _with_article([m.colour, m.shape])
    if size_after:
        return _with_article([m.colour, m.shape]) + f" that is {m.size}"
    return _with_article([m.size, m.colour, m.shape])


def _position_phrases(pos: Position) -> tuple[str, ...]:
    if pos.row is not None and pos.col is not None:
        if (pos.row, pos.col) == (1, 1):
            return ("in the centre", "in the middle")
        where = f"{ROW_NAMES[pos.row]} {COL_NAMES[pos.col]}"
        return (f"in the {where}", f"in the {where} corner")
    if pos.row is not None:
        if pos.row == 1:
            return ("in the middle row",)
        return (f"at the {ROW_NAMES[pos.row]}", f"in the {ROW_NAMES[pos.row]} row")
    if pos.col == 1:
        return ("in the centre column",)
    return (f"on the {COL_NAMES[pos.col]}", f"in the {COL_NAMES[pos.col]} column")


def _pick_phrase(options: tuple[str, ...], k: int) -> str:
    return options[k % len(options)]


def render_caption(parts: CaptionParts) -> str:
    """The caption text for `parts`.

    >>> render_caption(CaptionParts((Mention("red", "circle"), Mention("blue", "square")), "left"))
    'a red circle left of a blue square'
    """
    s, ms = parts.surface, parts.mentions
    if len(ms) == 1:
        pos = ""
        if parts.position is not None:
            pos = " " + _pick_phrase(_position_phrases(parts.position), s.phrase)
        a = _noun_phrase(ms[0], s.size_after and parts.position is None)
        return _pick_phrase(SINGLE_TEMPLATES, s.template).format(a=a, pos=pos)
    a, b = _noun_phrase(ms[0]), _noun_phrase(ms[1])
    if parts.relation is None:
        text = _pick_phrase(AND_TEMPLATES, s.template).format(a=a, b=b)
    else:
        rel = _pick_phrase(RELATION_PHRASES[parts.relation], s.phrase)
        text = _pick_phrase(RELATION_TEMPLATES, s.template).format(a=a, rel=rel, b=b)
    if len(ms) == 3:
        text += _pick_phrase(THIRD_JOINERS, s.joiner).format(c=_noun_phrase(ms[2]))
    return text


# ---------------------------------------------------------------- describing

def _maybe_size(obj: Obj, rng: np.random.Generator, p: float) -> str | None:
    return obj.size if rng.random() < p else None


def _position_of(obj: Obj, rng: np.random.Generator) -> Position | None:
    if rng.random() >= P_POSITION:
        return None
    options = [Position(row=obj.row), Position(col=obj.col)]
    if (obj.row != 1 and obj.col != 1) or (obj.row, obj.col) == (1, 1):
        options.append(Position(obj.row, obj.col))
    return options[int(rng.integers(len(options)))]


def describe(scene: Scene, rng: np.random.Generator) -> CaptionParts:
    """Draw a random true description of `scene`."""
    objs = scene.objects
    template, phrase, joiner = rng.integers(60, size=3).tolist()   # 60: a multiple of every list length
    surface = Surface(template=template, phrase=phrase, joiner=joiner)
    if len(objs) == 1:
        obj = objs[0]
        mention = Mention(obj.colour, obj.shape, _maybe_size(obj, rng, P_SINGLE_SIZE))
        position = _position_of(obj, rng)
        size_after = mention.size is not None and position is None and rng.random() < 0.3
        return CaptionParts((mention,), None, position, replace(surface, size_after=size_after))
    order = [objs[int(k)] for k in rng.permutation(len(objs))]
    mentions = tuple(Mention(o.colour, o.shape, _maybe_size(o, rng, P_SIZE)) for o in order)
    relation = None
    if rng.random() < P_RELATION:
        options = relations(order[0], order[1])
        relation = options[int(rng.integers(len(options)))]
    return CaptionParts(mentions, relation, None, surface)


# ---------------------------------------------------------------- checking

def _fits(m: Mention, obj: Obj) -> bool:
    return m.colour == obj.colour and m.shape == obj.shape and (m.size is None or m.size == obj.size)


def _at(obj: Obj, pos: Position) -> bool:
    return (pos.row is None or pos.row == obj.row) and (pos.col is None or pos.col == obj.col)


def caption_matches(scene: Scene, parts: CaptionParts) -> bool:
    """True when some distinct objects of `scene` satisfy every mention, the relation and the position."""
    for objs in permutations(scene.objects, len(parts.mentions)):
        if not all(_fits(m, o) for m, o in zip(parts.mentions, objs)):
            continue
        if parts.relation is not None and not holds(parts.relation, objs[0], objs[1]):
            continue
        if parts.position is not None and not _at(objs[0], parts.position):
            continue
        return True
    return False


def caption_kind(parts: CaptionParts) -> str:
    """What a caption asks of an image: "one object", "one object, position", "two objects", "two objects,
    relation", "three objects" or "three objects, relation"."""
    n = ("one", "two", "three")[len(parts.mentions) - 1]
    said = ", position" if parts.position is not None else ", relation" if parts.relation is not None else ""
    return f"{n} object{'s' if len(parts.mentions) > 1 else ''}{said}"


WHY_FALSE = ("where", "binding", "size", "shape", "colour", "several")  # why_false's answers


def why_false(scene: Scene, parts: CaptionParts) -> str:
    """Why a caption is false of `scene`: "where" (distinct objects fit the mentions, but not in the relation or
    position said); "binding" (they fit with either their colours or their shapes neglected: the attributes are
    there, bound to other objects); the one attribute whose neglect lets objects fit ("size", "shape",
    "colour"); else "several"."""
    def fit(neglect: str | None) -> bool:
        same = _fits if neglect is None else (lambda m, o: all(
            getattr(m, a) in (None, getattr(o, a)) for a in ("colour", "shape", "size") if a != neglect))
        return any(all(same(m, o) for m, o in zip(parts.mentions, objs))
                   for objs in permutations(scene.objects, len(parts.mentions)))

    if fit(None):
        return "where"
    fits = {attr: fit(attr) for attr in ("size", "shape", "colour")}
    if fits["shape"] and fits["colour"]:
        return "binding"
    return next((attr for attr, ok in fits.items() if ok), "several")


def mentions_held_out(parts: CaptionParts) -> bool:
    return any((m.colour, m.shape) in HELD_OUT for m in parts.mentions)


# ---------------------------------------------------------------- parsing

def _parse_mentions(tokens: list[str]) -> list[tuple[int, int, Mention]]:
    """(first token, end token, mention) for every colour-shape pair in order."""
    found = []
    for k in range(len(tokens) - 1):
        if tokens[k] in COLOURS and tokens[k + 1] in SHAPES:
            start, end, size = k, k + 2, None
            if k > 0 and tokens[k - 1] in SIZES:
                start, size = k - 1, tokens[k - 1]
            elif tokens[k + 2:k + 4] == ["that", "is"] and k + 4 < len(tokens) and tokens[k + 4] in SIZES:
                end, size = k + 5, tokens[k + 4]
            found.append((start, end, Mention(tokens[k], tokens[k + 1], size)))
    return found


def grounded_phrases(scene: Scene, text: str) -> list[tuple[int, int, Obj]]:
    """(start, end, object): the character span of each colour-shape mention of a true caption, and the
    object of `scene` it names (in a scene every colour-shape pair picks out one object)."""
    words = list(re.finditer(r"[a-z]+", text.lower()))
    out = []
    for first, end, m in _parse_mentions([w.group() for w in words]):
        obj = next((o for o in scene.objects if _fits(m, o)), None)
        if obj is not None:
            out.append((words[first].start(), words[end - 1].end(), obj))  # the noun phrase, size included
    return out


def _parse_position(tail: list[str]) -> Position | None:
    rows = {"top": 0, "middle": 1, "bottom": 2}
    cols = {"left": 0, "centre": 1, "right": 2}
    if "row" in tail:
        return Position(row=rows[tail[tail.index("row") - 1]])
    if "column" in tail:
        return Position(col=cols[tail[tail.index("column") - 1]])
    row = 0 if "top" in tail else 2 if "bottom" in tail else None
    col = 0 if "left" in tail else 2 if "right" in tail else None
    if row is None and col is None:
        return Position(1, 1) if {"centre", "middle"} & set(tail) else None
    return Position(row, col)


def parse_caption(text: str) -> CaptionParts:
    """Recover the meaning of a caption written by this grammar.

    >>> parse_caption("a blue square to the right of a small red circle").relation
    'right'
    """
    tokens = re.findall(r"[a-z]+", text.lower())
    found = _parse_mentions(tokens)
    if not found:
        raise ValueError(f"no colour-shape mention in caption {text!r}")
    mentions = tuple(m for _, _, m in found)
    if len(found) == 1:
        return CaptionParts(mentions, None, _parse_position(tokens[found[0][1]:]))
    between = tokens[found[0][1]:found[1][0]]
    rels = [_RELATION_WORDS[t] for t in between if t in _RELATION_WORDS]
    return CaptionParts(mentions, rels[0] if rels else None, None)


# ---------------------------------------------------------------- negatives

NEGATIVE_KINDS = ("relation_flip", "colour_swap", "shape_swap", "size_swap",
                  "position_flip", "size_flip", "colour_change")


def _swap(parts: CaptionParts, i: int, j: int, attr: str) -> CaptionParts:
    ms = list(parts.mentions)
    a, b = ms[i], ms[j]
    va, vb = getattr(a, attr), getattr(b, attr)
    ms[i] = Mention(**{**a.__dict__, attr: vb})
    ms[j] = Mention(**{**b.__dict__, attr: va})
    return CaptionParts(tuple(ms), parts.relation, parts.position, parts.surface)


def _flip_position(parts: CaptionParts, rng: np.random.Generator) -> CaptionParts:
    pos = parts.position
    assert pos is not None
    options = []
    if pos.row in (0, 2):
        options.append(Position(2 - pos.row, pos.col))
    if pos.col in (0, 2):
        options.append(Position(pos.row, 2 - pos.col))
    return replace(parts, position=options[int(rng.integers(len(options)))])


def _flip_relation(parts: CaptionParts) -> CaptionParts:
    assert parts.relation is not None
    return replace(parts, relation=OPPOSITE[parts.relation])


def _flip_size(parts: CaptionParts) -> CaptionParts:
    m = parts.mentions[0]
    assert m.size is not None
    return replace(parts, mentions=(Mention(m.colour, m.shape, SIZES[1 - SIZES.index(m.size)]),))


Edit = Callable[[], CaptionParts]


def _candidates(parts: CaptionParts, rng: np.random.Generator) -> list[tuple[float, str, Edit]]:
    """(weight, kind, edit) for every minimal edit that may make the caption false."""
    out: list[tuple[float, str, Edit]] = []
    ms = parts.mentions
    if parts.relation is not None:
        out.append((2.0, "relation_flip", lambda: _flip_relation(parts)))
    for i, j in [(0, 1), (0, 2), (1, 2)][: len(ms) * (len(ms) - 1) // 2]:
        w = 1.0 if (i, j) == (0, 1) else 0.5
        out.append((w, "colour_swap", lambda i=i, j=j: _swap(parts, i, j, "colour")))
        out.append((w, "shape_swap", lambda i=i, j=j: _swap(parts, i, j, "shape")))
        if ms[i].size is not None and ms[j].size is not None and ms[i].size != ms[j].size:
            out.append((w / 2, "size_swap", lambda i=i, j=j: _swap(parts, i, j, "size")))
    pos = parts.position
    if pos is not None and (pos.row in (0, 2) or pos.col in (0, 2)):
        out.append((1.0, "position_flip", lambda: _flip_position(parts, rng)))
    if len(ms) == 1 and ms[0].size is not None:
        out.append((1.0, "size_flip", lambda: _flip_size(parts)))
    return out


def _colour_change(scene: Scene, parts: CaptionParts, rng: np.random.Generator,
                   allow_held_out: bool) -> CaptionParts:
    used = {o.colour for o in scene.objects}
    i = int(rng.integers(len(parts.mentions)))
    m = parts.mentions[i]
    options = [c for c in COLOURS if c not in used and (allow_held_out or (c, m.shape) not in HELD_OUT)]
    ms = list(parts.mentions)
    ms[i] = replace(m, colour=options[int(rng.integers(len(options)))])
    return replace(parts, mentions=tuple(ms))


def negative_parts(scene: Scene, parts: CaptionParts, rng: np.random.Generator,
                   *, allow_held_out: bool = True) -> tuple[CaptionParts, str]:
    """A false variant of a true caption, and which edit made it (one of NEGATIVE_KINDS).

    Binding swaps and relation/position flips come first: they keep the words
    and change only who has which attribute or where things are. A colour
    change is the last resort and is always false, since a scene never has
    a colour that is absent from it.
    """
    cands = _candidates(parts, rng)
    keys = rng.random(len(cands)) ** (1.0 / np.array([w for w, _, _ in cands]))
    for k in np.argsort(-keys, kind="stable"):   # weighted order without replacement
        _, kind, edit = cands[int(k)]
        cand = edit()
        if caption_matches(scene, cand):
            continue
        if not allow_held_out and mentions_held_out(cand):
            continue
        return cand, kind
    return _colour_change(scene, parts, rng, allow_held_out), "colour_change"


def more_negatives(scene: Scene, parts: CaptionParts, rng: np.random.Generator, *,
                   allow_held_out: bool = True, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """Texts of every other minimal edit that makes a true caption false of `scene`, beside its hard negative.

    The edits `negative_parts` draws one of (binding swaps, relation, position and size flips), and two
    that it never makes: one mention's size flipped alone, and one mention's shape changed to another
    (drawn). Those two are what a scene holding the same objects in other sizes or shapes differs by,
    which a single drawn negative rarely covers. Texts in `exclude` (the hard negative) are left out.
    """
    edits = [edit() for _, _, edit in _candidates(parts, rng)]

    def changed(i: int, **attr) -> CaptionParts:
        ms = list(parts.mentions)
        ms[i] = replace(ms[i], **attr)
        return replace(parts, mentions=tuple(ms))

    for i, m in enumerate(parts.mentions):
        if m.size is not None:
            edits.append(changed(i, size=SIZES[1 - SIZES.index(m.size)]))
        shapes = [s for s in SHAPES if s != m.shape and (allow_held_out or (m.colour, s) not in HELD_OUT)]
        edits.append(changed(i, shape=shapes[int(rng.integers(len(shapes)))]))
    out = (render_caption(e) for e in edits
           if not caption_matches(scene, e) and (allow_held_out or not mentions_held_out(e)))
    return tuple(t for t in dict.fromkeys(out) if t not in exclude)


def hard_negative(scene: Scene, caption_parts: CaptionParts, rng: np.random.Generator,
                  *, allow_held_out: bool = True) -> str:
    """Text of a caption that is false of `scene` but worded like `caption_parts`.

    >>> from itm.data.synth.world import Obj, Scene
    >>> scene = Scene((Obj("red", "circle", "small", 1, 0), Obj("blue", "square", "large", 1, 2)), "sand")
    >>> parts = CaptionParts((Mention("red", "circle"), Mention("blue", "square")), "left")
    >>> caption_matches(scene, parse_caption(hard_negative(scene, parts, np.random.default_rng(0))))
    False
    """
    return render_caption(negative_parts(scene, caption_parts, rng, allow_held_out=allow_held_out)[0])


def _all_words() -> tuple[str, ...]:
    texts = [*SINGLE_TEMPLATES, *RELATION_TEMPLATES, *AND_TEMPLATES, *THIRD_JOINERS,
             *(p for ps in RELATION_PHRASES.values() for p in ps),
             "a an that is corner row column in the at on", *ROW_NAMES, *COL_NAMES,
             *COLOURS, *SHAPES, *SIZES]
    return tuple(sorted({w for t in texts for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", "", t))}))


WORDS: tuple[str, ...] = _all_words()


def truth_table(captions: Sequence[str], scenes: Sequence[Scene]) -> np.ndarray:
    """(len(captions), len(scenes)) bool: caption i is true of scene j, by the parser and checker.

    Only scenes that hold every mentioned colour-shape pair are checked, so this stays fast for
    thousands of captions and scenes.
    """
    holding: dict[tuple[str, str], set[int]] = {}
    for j, scene in enumerate(scenes):
        for o in scene.objects:
            holding.setdefault(o.combo, set()).add(j)
    out = np.zeros((len(captions), len(scenes)), dtype=bool)
    rows: dict[str, np.ndarray] = {}
    for i, text in enumerate(captions):
        if text not in rows:
            parts = parse_caption(text)
            row = np.zeros(len(scenes), dtype=bool)
            candidates = set.intersection(*(holding.get((m.colour, m.shape), set()) for m in parts.mentions))
            for j in candidates:
                row[j] = caption_matches(scenes[j], parts)
            rows[text] = row
        out[i] = rows[text]
    return out
