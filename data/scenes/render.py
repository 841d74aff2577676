"""Seeded rendering of photo-like scenes: a procedural place, then glyphs with shadows, far to near.

Places are numpy images built from gradients, noise textures and a few shapes (waves, trunks,
planks, stars); each render jitters their colours and textures. Glyphs are scaled to their boxes,
mirrored, tilted and pasted by z-order, with a soft shadow under things that stand, and tinted by
the place's light. The same (scene, size, seed) always gives the same pixels.
"""
from __future__ import annotations

from functools import cache, lru_cache

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter

from .glyphs import glyph
from .world import AIR, CATEGORIES, COLOURS, PLACES, WALL, Place, Scene, Thing

Pixels = npt.NDArray[np.float32]   # (size, size, 3), 0-255

HUE_WINDOW = 15.0    # degrees either side of a tinted glyph's hue that take the new colour
LIGHT: dict[str, tuple[float, float, float]] = {   # per-channel light on things, by place
    "night": (0.8, 0.82, 0.95), "forest": (0.9, 0.95, 0.88), "room": (1.0, 0.96, 0.9), "snow": (0.97, 0.99, 1.03),
    "desert": (1.04, 0.98, 0.9),
}
SHADOW = 0.38        # darkening at the centre of a standing thing's shadow
GRAIN = 2.5          # camera noise over the finished image, grey levels


# ---------------------------------------------------------------- textures

@lru_cache(maxsize=2)
def _tables(n: int) -> tuple[Pixels, Pixels, Pixels, Pixels]:
    """Fixed noise tables (fine, smooth, streaked, cloudy), each (n, n) with unit spread; renders read windows."""
    rng = np.random.default_rng(20261207)
    fine = rng.normal(0.0, 1.0, (n, n)).astype(np.float32)
    streak = np.cumsum(fine, axis=0)                       # vertical streaks: a running sum down columns
    streak = (streak - np.roll(streak, 6, axis=0)) / np.sqrt(6.0)
    return fine, _blobs(rng, n, n // 12, n // 12), streak.astype(np.float32), _blobs(rng, n, n // 14, n // 40)


def _blobs(rng: np.random.Generator, n: int, rows: int, cols: int) -> Pixels:
    """(n, n) smooth noise: a (rows, cols) grid of values stretched over it (rows > cols: wide blobs)."""
    coarse = Image.fromarray(rng.normal(0.0, 1.0, (rows, cols)).astype(np.float32), "F")
    out = np.asarray(coarse.resize((n, n), Image.Resampling.BICUBIC), dtype=np.float32)
    return out / out.std()


def _window(table: Pixels, size: int, rng: np.random.Generator) -> Pixels:
    y, x = (int(v) for v in rng.integers(0, table.shape[0] - size + 1, 2))
    return table[y:y + size, x:x + size]


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[Pixels, Pixels]:
    """(size, size) y and x of each pixel centre, as fractions of the image."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.repeat(c[:, None], size, 1), np.repeat(c[None, :], size, 0)


class _Canvas:
    """A float image being painted, with its noise windows and coordinates."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.rng, self.size = rng, size
        fine, smooth, streak, cloud = _tables(max(512, size))
        self.fine, self.smooth = _window(fine, size, rng), _window(smooth, size, rng)
        self.streak, self.cloud = _window(streak, size, rng), _window(cloud, size, rng)
        self.y, self.x = _grid(size)
        self.px = np.zeros((size, size, 3), np.float32)

    def colour(self, rgb: tuple[int, int, int], jitter: float = 10) -> Pixels:
        return np.array(rgb, np.float32) + self.rng.uniform(-jitter, jitter, 3).astype(np.float32)

    def fill(self, mask: npt.NDArray[np.bool_], top: tuple[int, int, int], bottom: tuple[int, int, int],
             y0: float, y1: float, texture: Pixels | float = 0.0) -> None:
        """Paint `mask` with a vertical gradient from `top` (at y0) to `bottom` (at y1), plus `texture`."""
        t = np.clip((self.y - y0) / max(y1 - y0, 1e-3), 0, 1)[..., None]
        paint = self.colour(top) * (1 - t) + self.colour(bottom) * t + np.asarray(texture, np.float32)[..., None]
        self.px = np.where(mask[..., None], paint, self.px)


# ---------------------------------------------------------------- places

def _sky(c: _Canvas, horizon: float, clouds: bool = True) -> None:
    cloud = np.clip(c.cloud - 0.5, 0, 1.2) * 70 if clouds else 0.0
    c.fill(c.y < horizon + 0.01, (95, 155, 225), (200, 222, 240), 0.0, horizon, cloud + c.fine * 1.5)


def _skyline(c: _Canvas, base: float, height: float, wiggle: float) -> npt.NDArray[np.bool_]:
    """Pixels above `base` under a bumpy line (hills, far trees): its height varies along x."""
    phase, freq = c.rng.uniform(0, 6.3), c.rng.uniform(5, 9)
    top = base - height * (0.6 + 0.4 * np.sin(c.x * freq + phase)) - wiggle * c.smooth
    return (c.y >= top) & (c.y < base + 0.01)


def _beach(c: _Canvas, p: Place) -> None:
    _sky(c, p.horizon)
    assert p.shore is not None
    sea = (c.y >= p.horizon) & (c.y < p.shore)
    waves = np.sin(c.y * c.size * 0.9 + c.smooth * 3) * 7
    c.fill(sea, (25, 85, 150), (70, 160, 190), p.horizon, p.shore, waves + c.fine * 3)
    c.fill(c.y >= p.shore, (205, 185, 140), (235, 215, 170), p.shore, 1.0, c.fine * 6 + c.smooth * 6)
    foam = np.abs(c.y - p.shore - 0.008 * np.sin(c.x * 20 + c.smooth)) < 0.012
    c.fill(foam, (235, 240, 240), (235, 240, 240), 0, 1, c.fine * 4)


def _snow(c: _Canvas, p: Place) -> None:
    c.fill(c.y < p.horizon, (125, 160, 205), (205, 218, 235), 0.0, p.horizon, c.cloud * 5 + c.fine)
    c.fill(_skyline(c, p.horizon, 0.13, 0.03), (120, 135, 160), (185, 195, 215), p.horizon - 0.16, p.horizon,
           c.fine * 3)
    c.fill(c.y >= p.horizon, (205, 217, 235), (246, 248, 252), p.horizon, 1.0, c.cloud * 6 + c.fine * 4)


def _field(c: _Canvas, p: Place) -> None:
    _sky(c, p.horizon)
    c.fill(_skyline(c, p.horizon, 0.05, 0.02), (40, 80, 45), (55, 100, 55), p.horizon - 0.08, p.horizon, c.fine * 5)
    c.fill(c.y >= p.horizon, (95, 140, 65), (75, 155, 55), p.horizon, 1.0, c.streak * 14 + c.smooth * 8)


def _road(c: _Canvas, p: Place) -> None:
    _field(c, p)
    depth = np.clip((c.y - p.horizon) / (1 - p.horizon), 0, 1)
    half = 0.03 + 0.6 * depth
    road = (c.y >= p.horizon) & (np.abs(c.x - 0.5) < half)
    c.fill(road, (105, 105, 110), (75, 75, 80), p.horizon, 1.0, c.fine * 6 + c.smooth * 4)
    edge = road & (np.abs(np.abs(c.x - 0.5) - half * 0.92) < 0.004 + 0.01 * depth)
    dash = np.sin(8.0 / (depth + 0.08)) > 0.2   # dashes shorten toward the horizon
    centre = road & (np.abs(c.x - 0.5) < 0.003 + 0.012 * depth) & dash
    c.fill(edge | centre, (230, 230, 225), (240, 240, 235), 0, 1, c.fine * 3)


def _lake(c: _Canvas, p: Place) -> None:
    _sky(c, p.horizon)
    assert p.shore is not None
    far = p.horizon + 0.07
    shore = (_skyline(c, p.horizon, 0.07, 0.03) | (c.y >= p.horizon)) & (c.y < far)
    c.fill(shore, (30, 70, 40), (45, 90, 50), p.horizon - 0.06, far, c.fine * 6)
    ripples = np.sin(c.y * c.size * 1.3 + c.streak.T * 0.8) * 6
    c.fill((c.y >= far) & (c.y < p.shore), (60, 110, 140), (35, 95, 135), far, p.shore, ripples + c.fine * 3)
    c.fill(c.y >= p.shore, (80, 130, 55), (70, 150, 50), p.shore, 1.0, c.streak * 12 + c.smooth * 6)


def _forest(c: _Canvas, p: Place) -> None:
    c.fill(c.y < p.horizon + 0.01, (150, 185, 150), (60, 95, 60), 0.0, p.horizon, c.smooth * 22 + c.fine * 4)
    for _ in range(int(c.rng.integers(6, 10))):
        x, w = c.rng.uniform(0, 1), c.rng.uniform(0.015, 0.05)
        trunk = (np.abs(c.x - x) < w) & (c.y < p.horizon + c.rng.uniform(0.0, 0.06))
        c.fill(trunk, (70, 55, 40), (55, 40, 30), 0.0, p.horizon, c.streak * 8)
    canopy = c.y < 0.1 + 0.08 * c.smooth
    c.fill(canopy, (45, 95, 45), (35, 80, 40), 0.0, 0.2, c.fine * 10 + c.smooth * 8)
    c.fill(c.y >= p.horizon, (90, 76, 48), (112, 88, 52), p.horizon, 1.0, c.fine * 10 + c.smooth * 7)


_WALLS = ((232, 222, 200), (205, 222, 230), (236, 214, 212), (218, 230, 206), (240, 236, 228))


def _room(c: _Canvas, p: Place) -> None:
    wall = _WALLS[int(c.rng.integers(len(_WALLS)))]
    stripes = np.sin(c.x * c.size * c.rng.uniform(0.3, 0.6)) * c.rng.uniform(0, 4)
    c.fill(c.y < p.horizon, wall, wall, 0.0, p.horizon, stripes + c.smooth * 1.5 + c.fine)
    c.fill((c.y >= p.horizon - 0.02) & (c.y < p.horizon), (245, 245, 240), (240, 240, 235), 0, 1, c.fine)
    depth = (c.y - p.horizon) / (1 - p.horizon)
    plank = np.floor((c.x - 0.5) / (0.08 + 0.12 * np.clip(depth, 0, 1)))   # boards widen toward the viewer
    shade = np.sin(plank * 12.9898) * 14
    seam = np.abs(np.modf((c.x - 0.5) / (0.08 + 0.12 * np.clip(depth, 0, 1)))[0]) < 0.04
    c.fill(c.y >= p.horizon, (150, 105, 65), (175, 125, 80), p.horizon, 1.0, shade + c.streak * 6 - seam * 30)


def _night(c: _Canvas, p: Place) -> None:
    stars = np.where(c.fine > 2.9, 150.0, 0.0)
    c.fill(c.y < p.horizon + 0.01, (8, 12, 35), (35, 45, 90), 0.0, p.horizon, stars + c.fine * 1.5)
    mx, my, r = c.rng.uniform(0.1, 0.9), c.rng.uniform(0.08, 0.25), c.rng.uniform(0.04, 0.06)
    c.fill((c.x - mx) ** 2 + (c.y - my) ** 2 < r * r, (240, 238, 215), (230, 228, 205), my - r, my + r)
    c.fill(_skyline(c, p.horizon, 0.08, 0.02), (18, 26, 35), (22, 32, 40), p.horizon - 0.1, p.horizon, c.fine * 2)
    c.fill(c.y >= p.horizon, (28, 40, 42), (45, 60, 55), p.horizon, 1.0, c.smooth * 6 + c.fine * 3)


def _desert(c: _Canvas, p: Place) -> None:
    _sky(c, p.horizon, clouds=False)
    c.fill(_skyline(c, p.horizon, 0.06, 0.02), (200, 150, 100), (215, 165, 110), p.horizon - 0.08, p.horizon,
           c.fine * 3)
    ridges = np.sin(c.x * 7 + c.y * 22 + c.cloud * 1.2) * 11
    c.fill(c.y >= p.horizon, (215, 160, 95), (235, 185, 115), p.horizon, 1.0, ridges + c.fine * 5)


_PAINTERS = {"beach": _beach, "snow": _snow, "field": _field, "road": _road, "lake": _lake, "forest": _forest,
             "room": _room, "night": _night, "desert": _desert}


def background(place: str, size: int, rng: np.random.Generator) -> Pixels:
    """(size, size, 3) float image of a place."""
    c = _Canvas(size, rng)
    _PAINTERS[place](c, PLACES[place])
    return c.px


# ---------------------------------------------------------------- things

@cache
def _hues() -> dict[str, float]:
    return {code: hue for c in CATEGORIES.values() for code, hue in c.tinted}


@lru_cache(maxsize=1024)
def tinted_glyph(code: str, colour: str | None) -> Image.Image:
    """A glyph with its coloured part (hue near its recorded hue) recoloured to `colour`, keeping its shading."""
    g = glyph(code)
    if colour is None:
        return g
    hsv = np.asarray(g.convert("RGB").convert("HSV"), dtype=np.float32)   # (h, w, 3), each 0-255
    dist = np.abs((hsv[..., 0] * 360 / 256 - _hues()[code] + 180) % 360 - 180)
    body = (dist < HUE_WINDOW) & (hsv[..., 1] > 25) & (np.asarray(g.getchannel("A")) > 0)
    hue, sat, val = COLOURS[colour]
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    h[body] = hue * 256 / 360
    s[body] *= sat * 255 / np.median(s[body])
    v[body] *= val * 255 / np.median(v[body])
    out = Image.fromarray(np.clip(hsv, 0, 255).astype(np.uint8), "HSV").convert("RGBA")
    out.putalpha(g.getchannel("A"))
    return out


@lru_cache(maxsize=4096)
def _lit_glyph(code: str, colour: str | None, light: tuple[float, float, float]) -> Image.Image:
    g = tinted_glyph(code, colour)
    if light == (1.0, 1.0, 1.0):
        return g
    px = np.asarray(g, dtype=np.float32) * np.array([*light, 1.0], np.float32)   # (h, w, 4); alpha kept
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8), "RGBA")


def _thing_image(t: Thing, size: int, light: tuple[float, float, float]) -> Image.Image:
    g = _lit_glyph(t.look, t.colour, light)
    im = g.resize((max(1, round(t.w * size)), max(1, round(t.h * size))), Image.Resampling.BILINEAR)
    if t.flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if t.angle:
        im = im.rotate(t.angle, resample=Image.Resampling.BICUBIC, expand=True)
    return im


def _shadows(scene: Scene, size: int) -> Pixels:
    """(size, size) darkening under the things that stand (not those that fly or hang)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for t in scene.things:
        if CATEGORIES[t.category].kind in (AIR, WALL):
            continue
        cx, bottom, rx, ry = t.cx * size, t.box[3] * size, 0.45 * t.w * size, max(1.5, 0.06 * t.h * size)
        draw.ellipse((cx - rx, bottom - ry * 1.3, cx + rx, bottom + ry * 0.7), fill=255)
    mask = mask.filter(ImageFilter.BoxBlur(max(1, size // 100)))
    return np.asarray(mask, dtype=np.float32) * (SHADOW / 255)


def render_scene(scene: Scene, size: int = 160, seed: int = 0) -> Image.Image:
    """The scene as an RGB image of `size` x `size` pixels.

    >>> from itm.data.scenes import sample_scene
    >>> render_scene(sample_scene(np.random.default_rng(0))).size
    (160, 160)
    """
    rng = np.random.default_rng(seed)
    px = background(scene.place, size, rng)
    px *= (1.0 - _shadows(scene, size))[..., None]
    img = Image.fromarray(np.clip(px, 0, 255).astype(np.uint8), "RGB")
    light = LIGHT.get(scene.place, (1.0, 1.0, 1.0))
    for t in sorted(scene.things, key=lambda t: t.z):
        im = _thing_image(t, size, light)
        img.paste(im, (round(t.cx * size - im.width / 2), round(t.cy * size - im.height / 2)), im)
    grain = _window(_tables(max(512, size))[0], size, rng)[..., None] * GRAIN
    out = np.asarray(img, dtype=np.float32) + grain
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")
