"""Fusion reranker checkpoints: safetensors weights plus a JSON sidecar holding the FusionConfig.

The file format, the pickle refusal and the hashing are itm.models.checkpoint's, shared with the
encoder checkpoints; this module adds what a reranker needs on top. The index builder
(itm.models.store_encoder) reads the same file for the store encoder's "store." tensors alone.

>>> save_reranker(model, Path("reranker.safetensors"))  # doctest: +SKIP
>>> load_reranker("reranker.safetensors")  # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

from itm.common.errors import CheckpointError

from .checkpoint import file_sha256, load_checkpoint, save_checkpoint, sidecar
from .fusion import FusionConfig, FusionReranker
from .store_encoder import RERANKER_KIND


def save_reranker(model: FusionReranker, path: Path | str) -> Path:
    """Write `path` (safetensors) and its `.json` sidecar (kind, format version, FusionConfig)."""
    return save_checkpoint(model.state_dict(), {"kind": RERANKER_KIND, "fusion_config": model.cfg.to_dict()},
                           Path(path))


def load_reranker(path: Path | str, device: str = "cpu") -> FusionReranker:
    """The reranker saved at `path`, in eval mode on `device`. Never unpickles."""
    path = Path(path)
    tensors, meta = load_checkpoint(path, RERANKER_KIND)
    try:
        cfg = FusionConfig.from_dict(meta["fusion_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"config {sidecar(path)} does not hold a valid fusion config ({e}); "
            "re-save the reranker with save_reranker") from None
    model = FusionReranker(cfg)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"checkpoint {path} does not fit its config {sidecar(path).name} ({detail}); "
            "the two files must come from the same save_reranker call") from None
    return model.to(device).eval()


def checkpoint_sha(path: Path | str, length: int = 16) -> str:
    """Identity of a checkpoint: the first `length` hex digits of the safetensors file's sha256."""
    return file_sha256(Path(path))[:length]
