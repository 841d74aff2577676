"""Which files are images to the scanner: decided without importing PIL or NumPy."""
from __future__ import annotations

import importlib.util

HEIF_AVAILABLE = importlib.util.find_spec("pillow_heif") is not None
"""True when the optional ``pillow-heif`` package (``pip install 'itm[heic]'``) is installed."""

_BASE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tiff", ".tif")
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    _BASE_EXTENSIONS + ((".heic", ".heif") if HEIF_AVAILABLE else ())
)
"""Lower-case file suffixes, with the dot, that the scanner treats as images."""
