"""Finding pretrained open_clip weights: the local cache first, then the hub, or one clear error."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import open_clip

from itm.common.errors import UnknownModelError, WeightsUnavailableError

HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PROBE_TIMEOUT_S = 3.0


def pretrained_source(arch: str, tag: str) -> str:
    """What to hand open_clip as `pretrained`: a cached file path, or the tag to download.

    Raises WeightsUnavailableError at once, instead of a minute of retries, when the
    weights are not cached and their host cannot be reached.
    """
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise UnknownModelError(
            f"{arch} has no pretrained weights tagged {tag!r}; known tags: {', '.join(tags) or 'none'}"
        )
    hub = cfg.get("hf_hub", "").strip("/")
    if hub:
        cached = _hf_cached(hub)
        if cached:
            return cached
        host = "huggingface.co"
    else:
        host = urlparse(cfg.get("url", "")).hostname or ""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _reachable(host):
        raise WeightsUnavailableError(
            f"cannot download weights {arch}/{tag}: {host or 'their host'} is unreachable and they are "
            "not cached; pass --checkpoint PATH, or use the bundled offline model with --model demo"
        )
    return tag


def _hf_cached(repo: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in HF_FILES:
        found = try_to_load_from_cache(repo_id=repo, filename=name)
        if isinstance(found, str) and Path(found).is_file():
            return found
    return None


def _reachable(host: str) -> bool:
    if not host:
        return False
    try:
        socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False
