"""Artwork of the photo-like world: Noto Color Emoji glyphs, cropped to their alpha and saved as PNGs.

The PNGs are package data (see LICENSE-NOTO.txt), written by `extract.py` from the font, so the
world draws without the font installed. A glyph is named by its code points in hex, joined by
"-": `glyph("1f415")` is the dog.
"""
from __future__ import annotations

from functools import cache
from importlib import resources

from PIL import Image


@cache
def glyph(code: str) -> Image.Image:
    """The RGBA image of one glyph (at most 72 px on its long side); a shared copy: do not modify it."""
    with resources.files(__package__).joinpath(f"{code}.png").open("rb") as f:
        image = Image.open(f)
        image.load()
    return image.convert("RGBA")


def aspect(code: str) -> float:
    """Width over height of a glyph."""
    w, h = glyph(code).size
    return w / h
