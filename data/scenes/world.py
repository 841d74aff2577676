"""Vocabulary, scene model and relations of the photo-like world.

A scene is one place (a background drawn procedurally: a beach, snow, a room, ...) and one to
six things (Noto emoji glyphs of animals, people, vehicles, food, ...) anywhere in the frame:
each thing has a box in fractions of the image, a z-order, a small tilt and maybe a mirror
flip. A category takes a colour only where colour is something people say ("a red car", "a
blue ball"); its glyphs are recoloured to it.

Relations are geometry on the boxes, with margins: a thing that is neither clearly left nor
clearly right of another is neither, so no caption calls it either. Sampling is in layout.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from .glyphs import aspect

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image, y down

# Hue (degrees), saturation and value given to the coloured part of a tinted glyph.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0, 0.85, 0.88), "orange": (27, 0.9, 0.98), "yellow": (52, 0.88, 0.98),
    "green": (120, 0.75, 0.7), "blue": (215, 0.85, 0.92), "purple": (280, 0.65, 0.75),
    "pink": (328, 0.5, 0.98),
}
GROUND, AIR, WATER, WALL = "ground", "air", "water", "wall"   # where a category goes in a place


@dataclass(frozen=True)
class Place:
    """A background and where things go in it; all heights are fractions of the image from the top."""

    name: str
    code: str                             # its letter in Category.places
    horizon: float                        # where the sky (or the wall) ends
    ground: tuple[float, float]           # range of the bottoms of things that stand
    sky: tuple[float, float]              # range of the centres of things that fly or hang
    water: tuple[float, float] | None = None   # range of the bottoms of things that float
    shore: float | None = None            # where water meets the ground in front


PLACES: dict[str, Place] = {p.name: p for p in (
    Place("beach", "b", 0.38, (0.66, 0.98), (0.1, 0.26), water=(0.45, 0.56), shore=0.57),
    Place("snow", "s", 0.42, (0.54, 0.98), (0.1, 0.3)),
    Place("field", "f", 0.42, (0.54, 0.98), (0.1, 0.3)),
    Place("road", "r", 0.4, (0.54, 0.98), (0.1, 0.28)),
    Place("lake", "l", 0.3, (0.8, 0.98), (0.08, 0.2), water=(0.46, 0.66), shore=0.7),
    Place("forest", "o", 0.56, (0.66, 0.98), (0.1, 0.38)),
    Place("room", "i", 0.56, (0.68, 0.98), (0.14, 0.38)),
    Place("night", "n", 0.58, (0.68, 0.98), (0.1, 0.4)),
    Place("desert", "d", 0.42, (0.54, 0.98), (0.1, 0.3)),
)}
_OUT = "bsfrlond"   # every outdoor place


@dataclass(frozen=True)
class Category:
    """A kind of thing people search for, and how it appears."""

    name: str
    plural: str
    kind: str                  # GROUND, AIR, WATER or WALL
    height: float              # its height as a fraction of the image when nearest the viewer
    places: str                # codes of the places it may be in
    looks: tuple[str, ...]     # glyphs drawn as they are (no colour is said of them)
    tinted: tuple[tuple[str, float], ...] = ()   # glyphs drawn in a colour, and the hue of their recoloured part
    colours: tuple[str, ...] = ()                # the colours of its tinted glyphs

    @property
    def all_looks(self) -> tuple[str, ...]:
        return self.looks + tuple(code for code, _ in self.tinted)


_ALL = tuple(COLOURS)
_PEOPLE = ("1f9cd", "1f6b6", "1f3c3", "1f9cd-200d-2642-fe0f", "1f9cd-200d-2640-fe0f", "1f6b6-200d-2640-fe0f",
           "1f3c3-200d-2640-fe0f", "1f6b6-1f3fd-200d-2642-fe0f", "1f9cd-1f3fe", "1f3c3-1f3fb-200d-2640-fe0f",
           "1f6b6-1f3ff", "1f9cd-1f3fc-200d-2640-fe0f")
_C = Category
# No category is a kind of another (there is no "bird" beside a "duck"): a caption's noun names one
# category, so a count or a category swap is false by construction, not by a reader's judgement.
CATEGORIES: dict[str, Category] = {c.name: c for c in (
    # animals
    _C("dog", "dogs", GROUND, 0.24, _OUT + "i", ("1f415", "1f429", "1f9ae", "1f415-200d-1f9ba")),
    _C("cat", "cats", GROUND, 0.2, "frion", ("1f408", "1f408-200d-2b1b")),
    _C("horse", "horses", GROUND, 0.34, "bsfrlod", ("1f40e",)),
    _C("cow", "cows", GROUND, 0.3, "sflr", ("1f404",)),
    _C("pig", "pigs", GROUND, 0.24, "flo", ("1f416",)),
    _C("sheep", "sheep", GROUND, 0.24, "sflo", ("1f411",)),
    _C("goat", "goats", GROUND, 0.26, "sfod", ("1f410",)),
    _C("rabbit", "rabbits", GROUND, 0.2, "sfoil", ("1f407",)),
    _C("mouse", "mice", GROUND, 0.14, "fio", ("1f401",)),
    _C("elephant", "elephants", GROUND, 0.38, "bfld", ("1f418",)),
    _C("camel", "camels", GROUND, 0.36, "bd", ("1f42a", "1f42b")),
    _C("monkey", "monkeys", GROUND, 0.24, "of", ("1f412",)),
    _C("deer", "deer", GROUND, 0.32, "sflon", ("1f98c",)),
    _C("bird", "birds", AIR, 0.14, _OUT, ("1f426", "1f54a")),
    _C("turtle", "turtles", GROUND, 0.16, "blf", ("1f422",)),
    _C("butterfly", "butterflies", AIR, 0.14, "flo", ("1f98b",)),
    _C("snail", "snails", GROUND, 0.14, "fo", ("1f40c",)),
    _C("squirrel", "squirrels", GROUND, 0.18, "ofs", ("1f43f",)),
    _C("giraffe", "giraffes", GROUND, 0.44, "fd", ("1f992",)),
    # people
    _C("person", "people", GROUND, 0.34, _OUT + "i", _PEOPLE),
    # vehicles
    _C("car", "cars", GROUND, 0.22, "bsfrlnd", (), (("1f697", 0), ("1f699", 205)), _ALL),
    _C("bus", "buses", GROUND, 0.32, "rsn", ("1f68c", "1f68d")),
    _C("truck", "trucks", GROUND, 0.3, "rsfnd", ("1f69a", "1f69b")),
    _C("bicycle", "bicycles", GROUND, 0.22, "rfobln", ("1f6b2",)),
    _C("motorcycle", "motorcycles", GROUND, 0.22, "rdnb", ("1f3cd",)),
    _C("boat", "boats", WATER, 0.26, "bl", ("26f5", "1f6a4", "1f6f6", "1f6e5")),
    _C("airplane", "airplanes", AIR, 0.2, "bsfrlnd", ("2708", "1f6e9")),
    _C("helicopter", "helicopters", AIR, 0.18, "bsfrlnd", ("1f681",)),
    _C("tractor", "tractors", GROUND, 0.28, "sfr", ("1f69c",)),
    _C("train", "trains", GROUND, 0.3, "sfdn", ("1f682", "1f686")),
    # food
    _C("apple", "apples", GROUND, 0.14, "ibf", (), (("1f34e", 5), ("1f34f", 85)), ("red", "green", "yellow")),
    _C("banana", "bananas", GROUND, 0.16, "ibf", ("1f34c",)),
    _C("pizza", "pizzas", GROUND, 0.18, "ibf", ("1f355",)),
    _C("cake", "cakes", GROUND, 0.18, "ibf", ("1f370", "1f382")),
    _C("burger", "burgers", GROUND, 0.17, "ibf", ("1f354",)),
    _C("ice cream", "ice creams", GROUND, 0.18, "ibf", ("1f366", "1f368")),
    _C("carrot", "carrots", GROUND, 0.16, "ifs", ("1f955",)),
    _C("watermelon", "watermelons", GROUND, 0.16, "ibf", ("1f349",)),
    _C("strawberry", "strawberries", GROUND, 0.14, "ibf", ("1f353",)),
    _C("donut", "donuts", GROUND, 0.14, "ibf", ("1f369",)),
    # furniture
    _C("chair", "chairs", GROUND, 0.28, "iblf", ("1fa91",)),
    _C("bed", "beds", GROUND, 0.26, "i", ("1f6cf",)),
    _C("couch", "couches", GROUND, 0.32, "i", ("1f6cb",)),
    _C("door", "doors", GROUND, 0.42, "i", ("1f6aa",)),
    _C("toilet", "toilets", GROUND, 0.26, "i", ("1f6bd",)),
    _C("bathtub", "bathtubs", GROUND, 0.26, "i", ("1f6c1",)),
    _C("window", "windows", WALL, 0.24, "i", ("1fa9f",)),
    # plants
    _C("tree", "trees", GROUND, 0.44, _OUT, ("1f333", "1f332", "1f334")),
    _C("flower", "flowers", GROUND, 0.18, "foil", ("1f337", "1f33b", "1f339", "1f33c")),
    _C("cactus", "cacti", GROUND, 0.3, "di", ("1f335",)),
    _C("mushroom", "mushrooms", GROUND, 0.15, "fo", ("1f344",)),
    _C("potted plant", "potted plants", GROUND, 0.26, "i", ("1fab4",)),
    # buildings
    _C("house", "houses", GROUND, 0.4, "sfrln", ("1f3e0", "1f3e1")),
    _C("castle", "castles", GROUND, 0.44, "sfln", ("1f3f0",)),
    _C("tent", "tents", GROUND, 0.3, "bsfold", ("26fa",)),
    _C("church", "churches", GROUND, 0.44, "sfrn", ("26ea",)),
    _C("hut", "huts", GROUND, 0.34, "bfod", ("1f6d6",)),
    _C("building", "buildings", GROUND, 0.46, "rn", ("1f3e2",)),
    # everyday objects
    _C("ball", "balls", GROUND, 0.13, "bsfilrn", ("26bd", "1f3d0"), (("1f3c0", 15),), _ALL),
    _C("balloon", "balloons", AIR, 0.18, _OUT + "i", (), (("1f388", 5),), _ALL),
    _C("umbrella", "umbrellas", GROUND, 0.28, "bfrs", (), (("2602", 245), ("1f302", 245), ("26f1", 5)), _ALL),
    _C("shirt", "shirts", GROUND, 0.18, "ib", (), (("1f455", 185), ("1f45a", 275)), _ALL),
    _C("cup", "cups", GROUND, 0.14, "ibf", ("2615",), (("1f964", 185),), _ALL),
    _C("hat", "hats", GROUND, 0.14, "ibfs", ("1f452", "1f3a9"), (("1f9e2", 205),), _ALL),
    _C("kite", "kites", AIR, 0.2, "bfls", ("1fa81",)),
    _C("book", "books", GROUND, 0.15, "ifb", (), (("1f4d5", 5),), _ALL),
    _C("backpack", "backpacks", GROUND, 0.18, "ifosrb", (), (("1f392", 5),), _ALL),
    _C("gift", "gifts", GROUND, 0.17, "isn", ("1f381",)),
    _C("clock", "clocks", GROUND, 0.17, "i", ("1f570", "23f0")),
    _C("guitar", "guitars", GROUND, 0.26, "ibfn", ("1f3b8",)),
    _C("teddy bear", "teddy bears", GROUND, 0.2, "if", ("1f9f8",)),
    _C("laptop", "laptops", GROUND, 0.17, "ib", ("1f4bb",)),
    _C("television", "televisions", GROUND, 0.24, "i", ("1f4fa",)),
    _C("shoe", "shoes", GROUND, 0.13, "ibsrf", ("1f45e", "1f462"), (("1f45f", 205),), _ALL),
    _C("vase", "vases", GROUND, 0.22, "i", ("1f3fa",)),
    _C("snowman", "snowmen", GROUND, 0.3, "sn", ("26c4",)),
    _C("picture", "pictures", WALL, 0.22, "i", ("1f5bc",)),
)}
COLOURED: tuple[str, ...] = tuple(c.name for c in CATEGORIES.values() if c.colours)  # categories that take a colour


def category_places(category: str) -> tuple[str, ...]:
    """Names of the places a category may be in."""
    codes = CATEGORIES[category].places
    return tuple(p.name for p in PLACES.values() if p.code in codes)


# ---------------------------------------------------------------- held out

@dataclass(frozen=True)
class HeldOut:
    colours: frozenset[tuple[str, str]]   # (category, colour)
    places: frozenset[tuple[str, str]]    # (category, place)
    wordings: frozenset[str]              # caption templates (captions.TEMPLATES)


# Compositions seen in one split only, to measure generalisation to new combinations of known
# parts: each category, colour, place and template is common in train, these pairs never are
# (not in images, captions or hard negatives). The test set is seen only in test, the val set
# only in val. A pair's category keeps other colours and places in train.
HELD_OUT: dict[str, HeldOut] = {
    "test": HeldOut(
        colours=frozenset({("car", "green"), ("ball", "blue"), ("balloon", "yellow"),
                           ("umbrella", "red"), ("shirt", "purple"), ("cup", "pink")}),
        places=frozenset({("dog", "snow"), ("horse", "beach"), ("car", "desert"),
                          ("bicycle", "forest"), ("person", "lake"), ("cat", "night")}),
        wordings=frozenset({"with_it"})),     # "a red car with two dogs left of it"
    "val": HeldOut(
        colours=frozenset({("car", "yellow"), ("ball", "green"), ("balloon", "purple"),
                           ("umbrella", "blue"), ("shirt", "red"), ("cup", "orange")}),
        places=frozenset({("dog", "forest"), ("horse", "snow"), ("car", "field"),
                          ("cat", "road"), ("person", "desert"), ("tree", "night")}),
        wordings=frozenset({"photo"})),       # "a photo of a dog on a beach"
}


@cache
def forbidden(split: str) -> HeldOut:
    """What a split must never hold: the held-out sets of the other splits."""
    others = [h for s, h in HELD_OUT.items() if s != split]
    return HeldOut(frozenset().union(*(h.colours for h in others)), frozenset().union(*(h.places for h in others)),
                   frozenset().union(*(h.wordings for h in others)))


# ---------------------------------------------------------------- scenes

@dataclass(frozen=True)
class Thing:
    """One glyph in a scene."""

    category: str
    look: str                  # glyph code
    colour: str | None         # set exactly when the look is tinted
    box: Box
    z: int = 0                 # drawing order: higher is in front
    angle: float = 0.0         # tilt in degrees, counter-clockwise
    flip: bool = False         # mirrored left to right

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    @property
    def w(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def h(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return self.w * self.h


@dataclass(frozen=True)
class Scene:
    """Things in one place."""

    place: str
    things: tuple[Thing, ...]

    def held_out(self, held: HeldOut) -> bool:
        """Does the scene hold a pair of `held`?"""
        return any((t.category, t.colour) in held.colours or (t.category, self.place) in held.places
                   for t in self.things)


def box_for(look: str, cx: float, bottom: float, height: float) -> Box:
    """The box of a glyph of `height` standing with its bottom centre at (cx, bottom)."""
    w = height * aspect(look)
    return (cx - w / 2, bottom - height, cx + w / 2, bottom)


# ---------------------------------------------------------------- relations

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below", "next_to", "in_front", "behind")
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above",
                            "in_front": "behind", "behind": "in_front"}
MIN_SHIFT = 0.1    # left/right/above/below: centres at least this far apart along the direction
NEXT_GAP = 0.5     # next to: a horizontal gap of at most this share of the narrower width
OCCLUDES = 0.08    # in front/behind: boxes share at least this share of the smaller one
# Layouts never have shares between TOUCH and OVERLAP (layout.py), so OCCLUDES is never borderline.
TOUCH, OVERLAP = 0.02, 0.15


def overlap(a: Thing, b: Thing) -> float:
    """The area the boxes share, as a share of the smaller box."""
    iw = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
    ih = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
    return max(0.0, iw) * max(0.0, ih) / min(a.area, b.area)


def _left(a: Thing, b: Thing) -> bool:
    # Each centre clear of the other box, and more apart across than up or down.
    dx = b.cx - a.cx
    return dx >= MIN_SHIFT and a.cx <= b.box[0] and a.box[2] <= b.cx and abs(b.cy - a.cy) <= dx


def _above(a: Thing, b: Thing) -> bool:
    dy = b.cy - a.cy
    return dy >= MIN_SHIFT and a.cy <= b.box[1] and a.box[3] <= b.cy and abs(b.cx - a.cx) <= dy


def _next_to(a: Thing, b: Thing) -> bool:
    # Side by side at about one height, close, and not one in front of the other.
    gap = max(b.box[0] - a.box[2], a.box[0] - b.box[2])
    shared_height = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
    return (gap <= NEXT_GAP * min(a.w, b.w) and shared_height >= 0.5 * min(a.h, b.h)
            and overlap(a, b) < OCCLUDES)


def holds(relation: str, a: Thing, b: Thing) -> bool:
    """Is `a` `relation` `b` ("left": a is left of b)?"""
    if relation == "left":
        return _left(a, b)
    if relation == "right":
        return _left(b, a)
    if relation == "above":
        return _above(a, b)
    if relation == "below":
        return _above(b, a)
    if relation == "next_to":
        return _next_to(a, b)
    if relation in ("in_front", "behind"):
        front = a.z > b.z if relation == "in_front" else a.z < b.z
        return front and overlap(a, b) >= OCCLUDES
    raise ValueError(f"unknown relation {relation!r}; expected one of {', '.join(RELATIONS)}")


def relations(a: Thing, b: Thing) -> tuple[str, ...]:
    """Every relation that holds of `a` with respect to `b`."""
    return tuple(r for r in RELATIONS if holds(r, a, b))

