"""Synthetic compositional image-caption world: scenes, renders, captions, splits.

    >>> from itm.data.synth import generate_split
    >>> sample = generate_split("test", 2, seed=0)[0]
    >>> image = sample.render()          # PIL image, 64 x 64 by default

Writing a dataset to disk: `python -m itm.data.synth.prepare` (see data/synth/prepare.py).
"""
from .captions import (
    NEGATIVE_KINDS,
    WORDS,
    CaptionParts,
    Mention,
    Position,
    Surface,
    caption_matches,
    describe,
    hard_negative,
    more_negatives,
    negative_parts,
    parse_caption,
    render_caption,
)
from .dataset import SPLITS, TWIN_KINDS, Sample, generate_split
from .render import render_scene
from .world import (
    BACKGROUNDS,
    COL_NAMES,
    COLOURS,
    HELD_OUT,
    ROW_NAMES,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    relations,
    sample_scene,
    swap_colours,
    swap_positions,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "COL_NAMES", "HELD_OUT", "NEGATIVE_KINDS", "ROW_NAMES", "SHAPES",
    "SIZES", "SPLITS", "TWIN_KINDS", "WORDS",
    "CaptionParts", "Mention", "Obj", "Position", "Sample", "Scene", "Surface",
    "caption_matches", "describe", "generate_split", "hard_negative", "more_negatives", "negative_parts",
    "parse_caption", "relations", "render_caption", "render_scene", "sample_scene",
    "swap_colours", "swap_positions",
]
