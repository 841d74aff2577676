"""A photo-like synthetic image-caption world: emoji things in procedurally drawn places.

Things people search for (animals, people, vehicles, food, furniture, plants, buildings, everyday
objects; Noto Color Emoji artwork, see glyphs/LICENSE-NOTO.txt) stand, fly or float anywhere in
a place (beach, snow, field, road, lake, forest, room, night, desert), in counts of one to four,
some in colours, beside, in front of or above each other. Captions come from a grammar with
several wordings per meaning; a parser reads them back and a checker decides their truth on any
scene.

    >>> from itm.data.scenes import generate_split, parse_caption, caption_matches
    >>> sample = generate_split("train", 1, seed=0)[0]
    >>> image = sample.render()                     # PIL RGB image, 160 x 160 by default
    >>> caption_matches(sample.scene, parse_caption(sample.captions[0]))
    True
    >>> caption_matches(sample.scene, parse_caption(sample.hard_negatives[0]))
    False

Writing a dataset to disk: `python -m itm.data.scenes.prepare OUT` (see prepare.py). Only numpy
and Pillow are needed; the glyph PNGs are package data.
"""
from .captions import (
    CAPTION_KINDS,
    PLACE_NOUNS,
    PLACE_PHRASES,
    RELATION_PHRASES,
    TEMPLATES,
    WHY_FALSE,
    CaptionParts,
    Mention,
    Wording,
    caption_kind,
    caption_matches,
    members,
    parse_caption,
    render_caption,
    templates_for,
    uses,
    why_false,
    wordings,
)
from .dataset import SPLITS, TWIN_FRACTION, Sample, generate_split, make_twin
from .describe import NEGATIVE_KINDS, describe, hard_negatives, negatives
from .layout import TWIN_KINDS, change_count, sample_scene, swap_positions
from .render import render_scene
from .world import (
    CATEGORIES,
    COLOURED,
    COLOURS,
    HELD_OUT,
    PLACES,
    RELATIONS,
    Category,
    HeldOut,
    Place,
    Scene,
    Thing,
    forbidden,
    holds,
    relations,
)

__all__ = [
    "CAPTION_KINDS", "CATEGORIES", "COLOURED", "COLOURS", "HELD_OUT", "NEGATIVE_KINDS", "PLACES", "PLACE_NOUNS",
    "PLACE_PHRASES", "RELATIONS", "RELATION_PHRASES", "SPLITS", "TEMPLATES", "TWIN_FRACTION", "TWIN_KINDS",
    "WHY_FALSE",
    "CaptionParts", "Category", "HeldOut", "Mention", "Place", "Sample", "Scene", "Thing", "Wording",
    "caption_kind", "caption_matches", "change_count", "describe", "forbidden", "generate_split", "hard_negatives",
    "holds", "make_twin", "members", "negatives", "parse_caption", "relations", "render_caption", "render_scene",
    "sample_scene", "swap_positions", "templates_for", "uses", "why_false", "wordings",
]
