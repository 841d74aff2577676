"""Seeded rendering of scenes with PIL.

Each image gets a tinted background with a soft gradient, blotches and a little
pixel noise, and objects jittered in size, colour and position inside their grid
cells, so no two renders of one scene are identical. The same (scene, size,
seed) always gives the same pixels.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from .world import BACKGROUNDS, COLOURS, GRID, Obj, Scene

# Object diameter as a fraction of a grid cell, per size word.
SIZE_SCALE: dict[str, tuple[float, float]] = {"small": (0.46, 0.56), "large": (0.78, 0.88)}
CENTRE_JITTER = 0.05   # fraction of a cell, each axis
COLOUR_JITTER = 12     # per channel, objects and background
NOISE_STD = 2.0        # background pixel noise, grey levels
SUPERSAMPLE = 2        # draw at 2x and downsample: smooth edges at little cost


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def _draw_obj(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
              fill: tuple[int, int, int]) -> None:
    if shape == "square":
        s = r * 0.86
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "cross":
        t = r * 0.36
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _jitter_rgb(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    d = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3).tolist()
    return tuple(min(255, max(0, c + e)) for c, e in zip(rgb, d))  # type: ignore[return-value]


_RAMP = np.linspace(-1.0, 1.0, 4, dtype=np.float32)


@lru_cache(maxsize=8)
def _upsampler(size: int) -> npt.NDArray[np.float32]:
    """(size, 4) matrix that bilinearly stretches 4 samples over `size` pixels."""
    pos = np.linspace(0.0, 3.0, size, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), 2)
    frac = pos - i0
    m = np.zeros((size, 4), dtype=np.float32)
    m[np.arange(size), i0] = 1.0 - frac
    m[np.arange(size), i0 + 1] = frac
    return m


@lru_cache(maxsize=1)
def _noise_table() -> npt.NDArray[np.float32]:
    # One fixed table; each image reads a window at a random offset (much
    # cheaper than drawing fresh noise per image).
    return np.random.default_rng(20240607).normal(0.0, NOISE_STD, (512, 512)).astype(np.float32)


def _background(name: str, size: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """(size, size, 3) background: tinted base, soft blotches, gradient, fine noise."""
    base = np.array(_jitter_rgb(BACKGROUNDS[name], rng), dtype=np.float32)
    ang, amp = rng.uniform(0, 2 * math.pi), rng.uniform(4, 14)
    grad = (math.cos(ang) * _RAMP[None, :] + math.sin(ang) * _RAMP[:, None]) * amp
    low = rng.normal(0.0, 6.0, (4, 4)).astype(np.float32) + grad       # (4, 4)
    up = _upsampler(size)
    field = up @ low @ up.T                                              # (size, size)
    table = _noise_table()
    y, x = (int(v) for v in rng.integers(0, table.shape[0] - size + 1, 2))
    field += table[y:y + size, x:x + size]
    out = base + field[:, :, None]                                       # (size, size, 3)
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


def _place(obj: Obj, cell: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """Centre x, centre y and radius in pixels, jittered inside the object's cell."""
    lo, hi = SIZE_SCALE[obj.size]
    u, ux, uy = rng.random(3).tolist()
    r = (lo + (hi - lo) * u) * cell / 2
    dx, dy = ((2 * ux - 1) * CENTRE_JITTER * cell, (2 * uy - 1) * CENTRE_JITTER * cell)
    return (obj.col + 0.5) * cell + dx, (obj.row + 0.5) * cell + dy, r


def render_scene(scene: Scene, size: int = 64, seed: int = 0) -> Image.Image:
    """Render `scene` as an RGB image of `size` x `size` pixels.

    >>> from itm.data.synth.world import Obj, Scene
    >>> render_scene(Scene((Obj("red", "star", "large", 0, 2),), "sand")).size
    (64, 64)
    """
    rng = np.random.default_rng(seed)
    img = Image.fromarray(_background(scene.background, size, rng), "RGB")
    # Nearest-neighbour up then box-filter down leaves the background as it was
    # and anti-aliases the shapes drawn in between.
    img = img.resize((size * SUPERSAMPLE, size * SUPERSAMPLE), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    cell = size * SUPERSAMPLE / GRID
    for obj in scene.objects:
        cx, cy, r = _place(obj, cell, rng)
        _draw_obj(draw, obj.shape, cx, cy, r, _jitter_rgb(COLOURS[obj.colour], rng))
    return img.reduce(SUPERSAMPLE)
