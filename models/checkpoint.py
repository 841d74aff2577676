"""Checkpoints as safetensors + a JSON sidecar: loading never unpickles.

torch is imported only to read or write tensors, so that hashing a checkpoint (a model's
identity) costs no torch import.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itm.common.errors import CheckpointError

FORMAT_VERSION = 1
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl"}

if TYPE_CHECKING:
    import torch


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(tensors: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> Path:
    """Write `path` (safetensors) and `path.json`; returns the safetensors path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # each file is written beside its final name and renamed, so a crash never leaves half a checkpoint
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    meta_tmp = path.with_name(f".{sidecar(path).name}.tmp")
    meta_tmp.write_text(json.dumps({"format": FORMAT_VERSION, **config}, indent=2, sort_keys=True) + "\n")
    os.replace(meta_tmp, sidecar(path))
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by save_checkpoint, checking that it holds a `kind` model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is a pickle checkpoint; itm loads only safetensors + JSON checkpoints "
            "(convert it with safetensors.torch.save_file)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        config = json.loads(sidecar(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no config {sidecar(path).name} beside it") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"config {sidecar(path)} is not valid JSON ({e})") from None
    if config.get("kind") != kind:
        raise CheckpointError(f"checkpoint {path} holds a {config.get('kind')!r} model, not a {kind!r} model")
    if int(config.get("format", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {config['format']}; upgrade itm to load it")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({e})") from None
    return tensors, config


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
