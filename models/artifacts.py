"""Rerankers that travel: a path, a URL, or `hf-hub:ORG/NAME[@REVISION]`, and the model card beside each.

A reranker is three files side by side: `reranker.safetensors` (weights), `reranker.json` (its
FusionConfig) and `reranker.card.json` (what it was trained for and how well it did: the encoder it
reads, the data, steps, losses, evaluation; written by itm-train). From the hub they are fetched with
huggingface_hub into its usual cache and read from there offline; from a URL, once, into itm's cache.

    >>> fetch_reranker("hf-hub:someone/itm-reranker-vit-b-32@v1")
    PosixPath('~/.cache/huggingface/hub/models--someone--itm-reranker-vit-b-32/snapshots/.../reranker.safetensors')
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from itm.common.durable import write_durably
from itm.common.errors import ModelMismatchError, UnknownModelError, WeightsUnavailableError
from itm.common.paths import cache_root

from .identity import ModelIdentity

HUB = "hf-hub:"
WEIGHTS, CONFIG, CARD = "reranker.safetensors", "reranker.json", "reranker.card.json"
CARD_FORMAT = 1


def card_path(reranker: Path | str) -> Path:
    """The model card beside a reranker checkpoint: `<name>.card.json`."""
    return Path(reranker).with_suffix(".card.json")


def fetch_reranker(ref: str | Path) -> Path:
    """The local checkpoint file a `--reranker` value names: a path as it is; a hub name or a URL fetched first
    (with its config and card), or read from the cache where it was fetched before."""
    ref = str(ref)
    if ref.startswith(HUB):
        return _from_hub(ref[len(HUB):])
    if ref.startswith(("http://", "https://")):
        return _from_url(ref)
    return Path(ref)


def _from_hub(name: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = name.partition("@")
    try:
        hf_hub_download(repo, CONFIG, revision=revision or None)
        weights = hf_hub_download(repo, WEIGHTS, revision=revision or None)
    except LocalEntryNotFoundError:
        raise WeightsUnavailableError(f"reranker {HUB}{name} is not in the Hugging Face cache and the hub cannot be "
                                      "reached; fetch it once online, or pass --reranker PATH") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise UnknownModelError(f"reranker {HUB}{name}: {type(e).__name__.removesuffix('Error')} on the hub "
                                f"(it must hold {WEIGHTS} and {CONFIG})") from None
    try:
        hf_hub_download(repo, CARD, revision=revision or None)
    except Exception:  # noqa: BLE001 - a card is welcome, not required
        pass
    return Path(weights)  # beside its config in one snapshot folder


def _from_url(url: str) -> Path:
    """The checkpoint at `url`, with `<name>.json` and `<name>.card.json` beside it, fetched once into the cache."""
    import urllib.error  # here, not above: 20 ms that every cold query would pay
    import urllib.request

    folder = cache_root() / "rerankers" / hashlib.sha256(url.encode()).hexdigest()[:24]
    weights = folder / WEIGHTS
    if weights.is_file() and (folder / CONFIG).is_file():
        return weights
    folder.mkdir(parents=True, exist_ok=True)
    base = url.removesuffix(".safetensors")
    for source, target, needed in ((f"{base}.json", CONFIG, True), (f"{base}.card.json", CARD, False),
                                   (url, WEIGHTS, True)):
        try:
            with urllib.request.urlopen(source, timeout=60) as r:
                data = r.read()
        except (urllib.error.URLError, OSError) as e:
            if needed:
                raise WeightsUnavailableError(f"cannot fetch reranker {source} ({e}); pass --reranker PATH to a "
                                              "local copy") from None
            continue
        write_durably(folder / target, lambda f: f.write(data))
    return weights


def write_card(reranker: Path, card: dict[str, Any]) -> Path:
    """Write the model card beside `reranker`."""
    path = card_path(reranker)
    data = json.dumps({"format": CARD_FORMAT, **card}, indent=1, sort_keys=True).encode()
    write_durably(path, lambda f: f.write(data))
    return path


def read_card(reranker: Path | str) -> dict[str, Any] | None:
    """The model card beside `reranker`, or None when it has none (or an unreadable one)."""
    try:
        card = json.loads(card_path(reranker).read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def check_card(reranker: Path | str, encoder: ModelIdentity) -> None:
    """Refuse a reranker whose card says it reads another encoder's features than `encoder`."""
    card = read_card(reranker)
    trained = (card or {}).get("encoder")
    if not isinstance(trained, dict):
        return
    same = (trained.get("arch"), trained.get("pretrained"), trained.get("checkpoint_sha256"),
            trained.get("embed_dim")) == (encoder.arch, encoder.pretrained, encoder.checkpoint_sha256,
                                          encoder.embed_dim)
    if not same:
        weights = trained.get("pretrained") or f"checkpoint {str(trained.get('checkpoint_sha256'))[:12]}"
        raise ModelMismatchError(f"reranker {reranker} was trained on {trained.get('arch')}/{weights} features "
                                 f"({trained.get('embed_dim')}-d), not {encoder.label}'s ({encoder.embed_dim}-d); "
                                 "pass the reranker trained for this encoder")


def copy_card(reranker: Path, target: Path) -> None:
    """Copy the card beside `reranker`, if it has one, beside `target`."""
    if card_path(reranker).is_file():
        data = card_path(reranker).read_bytes()
        write_durably(card_path(target), lambda f: f.write(data))
