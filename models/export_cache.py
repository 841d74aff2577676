"""Where exported graphs live: one folder per model identity, in the per-user cache, published whole.

An export is made once per model (models/onnx_export.py, models/fusion_export.py) and read
by every later build and query that uses that model, whatever the index. A folder's name is a
hash of what fixes the weights (architecture, pretrained tag, checkpoint and reranker hashes)
and of EXPORT_FORMAT, so a new itm that exports differently never reads an old folder. It is
written beside its final name and renamed into place, so a reader finds it complete or not at all.

    $ITM_CACHE_DIR, else $XDG_CACHE_HOME/itm, else ~/.cache/itm
        onnx/encoder-<key>/    text.onnx, image.onnx, tokenizer.json, encoder.json
        onnx/fusion-<key>/     fusion.onnx, fusion.json
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from itm.common.errors import ExportError
from itm.common.paths import cache_root

# Bump when an export's graphs or files change, so that caches made by an older itm are not read.
#   1: first format.
EXPORT_FORMAT = 1
REFUSED = ".refused"  # suffix of a file beside a folder's name saying why that model could not be exported


def export_key(**identity: Any) -> str:
    """A short hash of what fixes an export's weights, e.g. export_key(arch=..., pretrained=..., ...)."""
    data = json.dumps({"export_format": EXPORT_FORMAT, **identity}, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:24]


def export_dir(kind: str, key: str) -> Path:
    return cache_root() / "onnx" / f"{kind}-{key}"


def cached(kind: str, key: str) -> Path | None:
    """The folder of a complete export, or None."""
    folder = export_dir(kind, key)
    return folder if folder.is_dir() else None


def publish(kind: str, key: str, write: Callable[[Path], None]) -> Path:
    """Run write(folder) on a new folder beside the final one and rename it into place; returns the final folder.

    When another process published the same export meanwhile, its folder is kept and this one dropped.
    """
    final = export_dir(kind, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process got there first: theirs is complete too
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def exported(kind: str, key: str, write: Callable[[Path], None]) -> Path:
    """The folder of an export, made by write(folder) when the cache does not hold it yet.

    An ExportError from `write` is remembered beside the cache and raised again by later calls,
    so that a model that does not export is not exported again by every command. A cache that
    cannot be written raises ExportError too (the torch backend needs no cache).
    """
    folder = cached(kind, key)
    if folder is not None:
        return folder
    refused = export_dir(kind, key).with_name(export_dir(kind, key).name + REFUSED)
    if refused.is_file():
        raise ExportError(refused.read_text())
    try:
        return publish(kind, key, write)
    except ExportError as e:
        try:
            refused.write_text(str(e))
        except OSError:
            pass
        raise
    except OSError as e:
        raise ExportError(f"cannot write exported graphs under {cache_root()} ({e.strerror or e}); "
                          "set ITM_CACHE_DIR to a writable folder") from None
