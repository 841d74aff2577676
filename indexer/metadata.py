"""What users filter images on, read from a file's header at build time: size as shown, capture date, camera, GPS.

Only the header is read (no pixel is decoded), so that reading it costs next to nothing beside the
encoder. Anything missing or malformed is left None: metadata never makes an image unusable.

    >>> read_metadata(Path("photo.jpg").read_bytes())
    {'width': 4032, 'height': 3024, 'taken': '2024-07-14T18:03:22', 'camera_make': 'Apple', ...}
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from PIL import Image

from itm.models.images import _looks_like_heif, _register_heif

# The row columns this module fills (indexer/store.py holds their types); texts leave them null.
COLUMNS = ("width", "height", "taken", "camera_make", "camera_model", "gps_lat", "gps_lon")

_ORIENTATION, _MAKE, _MODEL, _DATETIME = 0x0112, 0x010F, 0x0110, 0x0132
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED = 0x9003, 0x9004
_EXIF_DATE = re.compile(r"^(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})")


def empty() -> dict[str, Any]:
    return dict.fromkeys(COLUMNS)


def read_metadata(data: bytes) -> dict[str, Any]:
    """The COLUMNS of an image file's bytes; width and height as the image is shown (EXIF rotation applied)."""
    out = empty()
    if _looks_like_heif(data):
        _register_heif()
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            exif = im.getexif()
            rotated = exif.get(_ORIENTATION) in (5, 6, 7, 8)  # 90 or 270 degrees: shown with the sides swapped
            out.update(width=height if rotated else width, height=width if rotated else height)
            out.update(_exif_fields(exif))
    except Exception:  # noqa: BLE001 - a header Pillow cannot read holds nothing to filter on
        pass
    return out


def read_file_metadata(path: Path) -> dict[str, Any]:
    """read_metadata of a file; all None when it cannot be read."""
    try:
        return read_metadata(Path(path).read_bytes())
    except OSError:
        return empty()


def _exif_fields(exif: Image.Exif) -> dict[str, Any]:
    out: dict[str, Any] = {"camera_make": _text(exif.get(_MAKE)), "camera_model": _text(exif.get(_MODEL))}
    try:
        sub = exif.get_ifd(_EXIF_IFD)
    except Exception:  # noqa: BLE001
        sub = {}
    out["taken"] = next(filter(None, map(_date, (sub.get(_DATETIME_ORIGINAL), sub.get(_DATETIME_DIGITIZED),
                                                  exif.get(_DATETIME)))), None)
    try:
        gps = exif.get_ifd(_GPS_IFD)
    except Exception:  # noqa: BLE001
        gps = {}
    out["gps_lat"] = _degrees(gps.get(2), gps.get(1), "S")
    out["gps_lon"] = _degrees(gps.get(4), gps.get(3), "W")
    return out


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value or None


def _date(value: Any) -> str | None:
    """EXIF's 'YYYY:MM:DD HH:MM:SS' (the camera's local time, no zone) as ISO 8601 'YYYY-MM-DDTHH:MM:SS'."""
    m = _EXIF_DATE.match(_text(value) or "")
    if not m or m.group(1) == "0000":
        return None
    y, mo, d, h, mi, s = m.groups()
    return f"{y}-{mo}-{d}T{h}:{mi}:{s}"


def _degrees(dms: Any, ref: Any, negative: str) -> float | None:
    """GPS degrees, minutes, seconds (three rationals) and a hemisphere letter as signed decimal degrees."""
    try:
        deg, minutes, seconds = (float(x) for x in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = deg + minutes / 60 + seconds / 3600
    if not (0 <= value <= 180):
        return None
    return -value if (_text(ref) or "").upper() == negative else value
