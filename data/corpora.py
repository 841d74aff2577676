"""Generated corpora: random images, and a folder of broken and odd image files (tests and benchmarks).

``write_images(dir, n)`` writes n distinct random images, some in a subfolder.

``make_odd_files(dir)`` writes files with odd contents and returns ``{file name: "ok" | "skip"}``:
what an index build should do with each one with default settings (decode it, or skip it with
a reason). Shared by the decoder tests and the build tests. ``make_hostile_folder(dir)`` adds
odd names and odd kinds of directory entries around them (names that are not UTF-8, newlines,
links that loop or dangle, a pipe, a folder named like an image, a complete decompression bomb)
and returns the same kind of map, keyed by path relative to ``dir``.
"""
from __future__ import annotations

import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
HUGE_HEADER_SIZE = (20_000, 20_000)  # 400 MP: over the default 100 MP cap
GREY16_VALUES = (0, 32768, 65535, 256)  # one row of the 16-bit greyscale PNG
UNREADABLE = "unreadable.jpg"


def make_odd_files(dir: Path) -> dict[str, str]:
    """Write the odd files into ``dir`` (created if needed); return name -> expected outcome."""
    dir.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    for name, (data, outcome) in _files().items():
        (dir / name).write_bytes(data)
        expected[name] = outcome
    expected[UNREADABLE] = _write_unreadable(dir / UNREADABLE)
    return expected


def make_hostile_folder(dir: Path) -> dict[str, str]:
    """The odd files, plus odd names and entries; returns {relative path (os.fsdecode'd): "ok" | "skip"}."""
    expected = make_odd_files(dir)
    raw = os.fsencode(dir)
    for name, (data, outcome) in _odd_names().items():
        path = raw + b"/" + name
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        expected[os.fsdecode(name)] = outcome
    for name, target, outcome in (("link.png", "plain.jpg", "ok"), ("dangling.png", "missing.png", "skip"),
                                  ("loop.png", "loop.png", "skip")):
        os.symlink(target, dir / name)
        expected[name] = outcome
    os.symlink(".", dir / "cycle")  # a folder that contains itself: scanned once, no item
    os.mkfifo(dir / "pipe.png")  # never opened: reading a pipe would wait forever
    expected["pipe.png"] = "skip"
    return expected


def _odd_names() -> dict[bytes, tuple[bytes, str]]:
    def image(colour) -> bytes:
        return _encode(Image.new("RGB", (9, 7), colour), "PNG")

    return {
        b"latin1-caf\xe9.png": (image((1, 2, 3)), "ok"),  # not UTF-8: copied from an old system or a zip
        b"broken-\x80\xff.jpg": (b"\xff\xd8\xff\x00 not a jpeg", "skip"),
        b"two\nlines.png": (image((4, 5, 6)), "ok"),
        b"quote\"s, \\back\\slashes & 'apostrophes'.png": (image((7, 8, 9)), "ok"),
        b"l" * 240 + b".png": (image((10, 11, 12)), "ok"),  # near the 255-byte name limit
        b"SHOUTING.JPG": (_encode(Image.new("RGB", (8, 8), BLUE), "JPEG"), "ok"),
        b"folder.png/inside.png": (image((13, 14, 15)), "ok"),  # a folder named like an image
        b"bomb.png": (_bomb_png(), "skip"),
    }


def _files() -> dict[str, tuple[bytes, str]]:
    return {
        "plain.jpg": (_encode(Image.new("RGB", (64, 48), (200, 120, 40)), "JPEG"), "ok"),
        "empty.jpg": (b"", "skip"),
        "truncated.jpg": (_truncated_jpeg(), "skip"),
        "garbage.jpg": (b"\xff\xd8\xff" + random.Random(1).randbytes(2000), "skip"),
        "text.png": (b"this is a note, not a picture\n" * 20, "skip"),
        "png_named.jpg": (_encode(Image.new("RGB", (10, 6), GREEN), "PNG"), "ok"),
        "palette_transparent.png": (_encode(_halves("P", 0, 1, palette=True), "PNG", transparency=0), "ok"),
        "rgba.png": (_encode(_halves("RGBA", (0, 0, 0, 0), (*BLUE, 255)), "PNG"), "ok"),
        "la.png": (_encode(_halves("LA", (0, 0), (100, 255)), "PNG"), "ok"),
        "cmyk.jpg": (_encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95), "ok"),
        "grey16.png": (_grey16_png(), "ok"),
        "bilevel.bmp": (_encode(_halves("1", 0, 1), "BMP"), "ok"),
        "exif_rotated.jpg": (_exif_rotated_jpeg(), "ok"),
        "animated.gif": (_animated("GIF"), "ok"),
        "animated.webp": (_animated("WEBP", lossless=True), "ok"),
        "huge_header.png": (huge_header_png(), "skip"),
        "café ünïcode.png": (_encode(Image.new("RGB", (5, 5), RED), "PNG"), "ok"),
    }


def _encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _halves(mode: str, left, right, *, size=(8, 8), palette: bool = False) -> Image.Image:
    """Left half ``left``, right half ``right``."""
    im = Image.new(mode, size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    if palette:
        im.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)  # index 0 black (transparent), 1 red
    return im


def _truncated_jpeg() -> bytes:
    noise = Image.frombytes("RGB", (256, 256), random.Random(0).randbytes(256 * 256 * 3))
    data = _encode(noise, "JPEG", quality=90)
    return data[: len(data) // 2]


def _grey16_png() -> bytes:
    im = Image.new("I;16", (len(GREY16_VALUES), 1))
    for x, value in enumerate(GREY16_VALUES):
        im.putpixel((x, 0), value)
    return _encode(im, "PNG")


def _exif_rotated_jpeg() -> bytes:
    """Stored 40x20, left half red, right half blue; orientation 6 (display rotated 90° CW)."""
    im = _halves("RGB", RED, BLUE, size=(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(im, "JPEG", quality=95, exif=exif.tobytes())


def _animated(fmt: str, **params) -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)


def huge_header_png() -> bytes:
    """A valid PNG header that claims 20000 x 20000 pixels, with almost no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", *HUGE_HEADER_SIZE, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bomb_png() -> bytes:
    """A complete, valid 1-bit PNG of 20000 x 20000 zeros: 48 kB that decode to 400 megapixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    width, height = HUGE_HEADER_SIZE
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the row's bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _write_unreadable(path: Path) -> str:
    """A valid JPEG with mode 000. Root (and CAP_DAC_OVERRIDE) still reads it, so the
    expected outcome is whatever this process can actually do."""
    path.write_bytes(_encode(Image.new("RGB", (8, 8), RED), "JPEG"))
    os.chmod(path, 0)
    try:
        with open(path, "rb"):
            return "ok"
    except PermissionError:
        return "skip"


def write_images(folder: Path, n: int, seed: int = 0, size=(40, 48)) -> list[Path]:
    """n distinct random images, some in a subfolder."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / ("sub" if i % 3 == 0 else "") / f"img{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths
