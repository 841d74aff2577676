"""Robust image decoding: any supported file in, an RGB ``PIL.Image`` out, or a ``DecodeError``.

Process-wide effect: importing this module sets ``PIL.Image.MAX_IMAGE_PIXELS = None``.
Pillow's own decompression-bomb check is a global threshold that warns at 89 MP and
raises at 179 MP; ``load_image`` replaces it with a per-call cap (``max_pixels``) that is
checked from the header before any pixel is decoded, so users can raise it per build.
Code elsewhere in this process that opens untrusted images should go through
``load_image`` too. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False (Pillow's
default) so truncated files raise instead of decoding to grey.
"""
from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from itm.common.errors import DecodeError
from itm.common.options import DEFAULT_MAX_PIXELS

from .formats import HEIF_AVAILABLE, IMAGE_EXTENSIONS

__all__ = ["DEFAULT_MAX_PIXELS", "HEIF_AVAILABLE", "IMAGE_EXTENSIONS", "load_image"]

Image.MAX_IMAGE_PIXELS = None  # replaced by the per-call ``max_pixels`` check below


_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_REASON_MAX_CHARS = 120


def load_image(
    data: bytes | Path, *, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an image file's bytes (or a path) into an RGB image.

    JPEGs much larger than needed are decoded at a reduced size (1/2, 1/4 or 1/8 by
    DCT scaling) that keeps the shorter side >= ``min_side``; EXIF orientation is
    applied; transparency is composited onto white; animated files give their first
    frame. Raises ``DecodeError`` with a short reason for anything unusable.

        >>> img = load_image(Path("photo.jpg").read_bytes(), min_side=224)
        >>> img.mode
        'RGB'
    """
    if min_side < 1:
        raise ValueError(f"min_side must be positive, got {min_side}")
    raw = read_file(data) if isinstance(data, Path) else bytes(data)
    if not raw:
        raise DecodeError("empty file")
    if _looks_like_heif(raw):
        _register_heif()
    im = _open(raw)
    try:
        _check_pixels(im.size, max_pixels)
        im.draft("RGB", (min_side, min_side))  # no-op for everything but JPEG
        _load(im)
        return _to_rgb(_apply_orientation(im))
    finally:
        im.close()


def read_file(path: Path) -> bytes:
    """The bytes of a file, or DecodeError with a short reason."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except IsADirectoryError:
        raise DecodeError("is a directory, not a file") from None
    except OSError as exc:
        raise DecodeError(f"cannot read file ({exc.strerror or exc})") from None


def _looks_like_heif(raw: bytes) -> bool:
    # ISO base media files (HEIC/HEIF/AVIF) start with a box whose type is 'ftyp'.
    return raw[4:8] == b"ftyp"


@functools.cache
def _register_heif() -> bool:
    """Register pillow-heif's opener with Pillow, once; False when it is not installed."""
    if not HEIF_AVAILABLE:
        return False
    import pillow_heif

    pillow_heif.register_heif_opener()
    return True


def _open(raw: bytes) -> Image.Image:
    """Read the header only; no pixel data is decoded yet."""
    try:
        im = Image.open(io.BytesIO(raw))
        im.seek(0)  # first frame of animated GIF/WebP/TIFF
        return im
    except UnidentifiedImageError:
        if _looks_like_heif(raw) and not HEIF_AVAILABLE:
            raise DecodeError(
                "HEIC/HEIF image needs the optional pillow-heif package "
                "(pip install 'itm[heic]')"
            ) from None
        raise DecodeError("not an image (cannot identify format)") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"over Pillow's decompression-bomb limit ({exc})") from None
    # Pillow's format plugins raise many exception types on malformed headers
    # (SyntaxError, struct.error, ValueError, EOFError, ...); all mean "unusable file".
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(_failure_reason(exc, "corrupt image header")) from None


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise DecodeError(f"image is {width} x {height} pixels, nothing to decode")
    if width * height > max_pixels:
        raise DecodeError(
            f"image is {width} x {height}, over the pixel cap of {max_pixels}; "
            "raise --max-pixels to allow it"
        )


def _load(im: Image.Image) -> None:
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001 - decoders fail in plugin-specific ways
        raise DecodeError(_failure_reason(exc, "corrupt image data")) from None


def _failure_reason(exc: Exception, fallback: str) -> str:
    message = str(exc).strip()
    if isinstance(exc, EOFError) or "truncated" in message.lower():
        return "truncated image data"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    detail = message.splitlines()[0][:_REASON_MAX_CHARS] if message else type(exc).__name__
    return f"{fallback} ({detail})"


def _apply_orientation(im: Image.Image) -> Image.Image:
    # Orientation is metadata: a malformed EXIF block should not cost us the pixels.
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to a new RGB image, independent of the source file."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_l(im).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return _composite_on_white(im)
    try:
        return im.convert("RGB")  # 1, L, P, RGB, CMYK, YCbCr, ... (a copy when already RGB)
    except (ValueError, OSError) as exc:
        raise DecodeError(f"unsupported image mode {mode} ({exc})") from None


def _composite_on_white(im: Image.Image) -> Image.Image:
    try:
        rgba = im.convert("RGBA")  # palette/greyscale transparency becomes an alpha channel
    except (ValueError, OSError) as exc:
        raise DecodeError(f"unsupported image mode {im.mode} ({exc})") from None
    out = Image.new("RGB", rgba.size, _WHITE)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float greyscale to 8 bits (Pillow would clip)."""
    values = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        top = 1.0 if values.size and values.max() <= 1.0 else 255.0
    elif im.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        lo, hi = float(values.min()), float(values.max())
        values, top = values - lo, max(hi - lo, 1.0)
    else:
        top = 65535.0  # I;16* and mode I holding 16-bit samples (e.g. 16-bit PNG)
    scaled = np.rint(np.clip(values, 0.0, top) * (255.0 / top))
    return Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8 -> mode L
