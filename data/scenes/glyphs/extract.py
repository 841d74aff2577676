"""Write the world's glyph PNGs from the Noto Color Emoji font.

    python -m itm.data.scenes.glyphs.extract [--font PATH] [--out DIR]

Needs Debian's fonts-noto-color-emoji (or the font file from github.com/googlefonts/noto-emoji).
Each glyph that a category of world.py uses is drawn in colour at the font's bitmap size (109),
cropped to its alpha, shrunk to at most MAX_SIDE px on its long side and saved as CODE.png beside
this file. The PNGs are committed, so the world needs neither the font nor this script.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..world import CATEGORIES

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109    # the only size of the font's colour bitmaps
MAX_SIDE = 72      # px, long side: as large as a thing is drawn in a 160-px scene
CANVAS = 192       # px, room for any one glyph at FONT_SIZE


def needed_codes() -> list[str]:
    """Every glyph code used by a category, sorted."""
    return sorted({code for c in CATEGORIES.values() for code in c.all_looks})


def _text(code: str) -> str:
    return "".join(chr(int(part, 16)) for part in code.split("-"))


def render_glyph(font: ImageFont.FreeTypeFont, code: str) -> Image.Image:
    """One glyph in colour, cropped to its alpha and shrunk to MAX_SIDE."""
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((16, 16), _text(code), font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None or box[2] - box[0] > 1.4 * FONT_SIZE:
        # A sequence the font lacks falls apart into several glyphs side by side.
        raise ValueError(f"the font has no single glyph for {code}")
    glyph = canvas.crop(box)
    scale = MAX_SIDE / max(glyph.size)
    if scale < 1:
        size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
        # Premultiplied, so that transparent pixels' colours do not bleed into the edges.
        glyph = glyph.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    return glyph


def extract(font_path: Path, out: Path) -> int:
    """Write every needed glyph under `out`; returns the total bytes written."""
    font = ImageFont.truetype(str(font_path), FONT_SIZE)
    total = 0
    for code in needed_codes():
        path = out / f"{code}.png"
        render_glyph(font, code).save(path, optimize=True)
        total += path.stat().st_size
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the photo-like world's glyph PNGs from Noto Color Emoji.")
    p.add_argument("--font", type=Path, default=FONT, help="NotoColorEmoji.ttf")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="folder for the PNGs")
    a = p.parse_args(argv)
    if not a.font.is_file():
        raise SystemExit(f"{a.font} not found; install fonts-noto-color-emoji or pass --font")
    total = extract(a.font, a.out)
    print(f"wrote {len(needed_codes())} glyphs ({total} bytes) to {a.out}")


if __name__ == "__main__":
    main()
