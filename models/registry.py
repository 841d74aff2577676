"""Which dual encoder to load: open_clip architectures, itm's own configs, checkpoints, bundles.

A *model spec* names an architecture plus where its weights come from: an open_clip
pretrained tag (downloaded and cached the usual open_clip / Hugging Face way), a local
checkpoint file, or `random` (seeded random weights, for tests). A *bundle* is a folder
with `bundle.json` naming an encoder checkpoint and optionally a fusion reranker; the
demo model shipped in `data/demo` is one.

open_clip is imported only to check a name the user gave; the model an index names is trusted
as the index recorded it, so that a rebuild with nothing to encode, or a query through exported
graphs, never imports it.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from types import ModuleType

from itm.common.errors import UnknownModelError
from itm.common.options import DEFAULT_MODEL
from itm.common.paths import demo_dir

from .artifacts import fetch_reranker
from .checkpoint import file_sha256
from .identity import ModelIdentity

DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
RANDOM = "random"  # explicit seeded random weights; never a silent fallback
CONFIG_DIR = Path(str(files(__package__) / "model_configs"))
BUNDLES = {"demo": demo_dir()}


@functools.cache
def open_clip_registry() -> ModuleType:
    """open_clip, with itm's own architectures (models/model_configs) registered."""
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    return open_clip


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # open_clip architecture name, e.g. ViT-B-32 or itm-tiny
    pretrained: str | None = None  # open_clip pretrained tag, or "random"
    checkpoint: Path | None = None  # local encoder checkpoint (safetensors+JSON, or an open_clip file)
    reranker: Path | None = None  # fusion reranker checkpoint that comes with the model
    name: str | None = None  # the name the user gave, when it was a bundle


def list_models() -> list[str]:
    """Every name `--model` accepts: bundles first, then open_clip architectures."""
    return sorted(BUNDLES) + open_clip_registry().list_models()


def resolve_model(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    checkpoint: Path | str | None = None,
    reranker: Path | str | None = None,
) -> ModelSpec:
    """Turn command-line style choices into a ModelSpec.

    >>> resolve_model("ViT-B-32").pretrained
    'laion2b_s34b_b79k'
    """
    reranker = fetch_reranker(reranker) if reranker else None  # a path, a URL or hf-hub:ORG/NAME[@REVISION]
    if model in BUNDLES or Path(model, "bundle.json").is_file():
        spec = _bundle_spec(model, reranker)
        if checkpoint:  # taking the bundle's encoder instead would answer for other weights than asked
            raise UnknownModelError(f"model {model!r} is a bundle with its own encoder; for the weights in "
                                    f"{checkpoint}, name their architecture: --model {spec.arch} --checkpoint PATH")
        return spec
    if not _is_architecture(model):
        raise UnknownModelError(
            f"unknown model {model!r}; choose one of: {', '.join(sorted(BUNDLES))}, "
            "or an open_clip architecture such as ViT-B-32 (see open_clip.list_models())"
        )
    if checkpoint:
        return ModelSpec(model, None, Path(checkpoint), reranker)
    if pretrained is None:
        if model != DEFAULT_MODEL:
            tags = open_clip_registry().list_pretrained_tags_by_model(model)
            raise UnknownModelError(
                f"model {model} needs weights: pass --pretrained TAG"
                + (f" (one of {', '.join(tags)})" if tags else "")
                + " or --checkpoint PATH"
            )
        pretrained = DEFAULT_PRETRAINED
    return ModelSpec(model, pretrained, None, reranker)


def _is_architecture(name: str) -> bool:
    """Whether open_clip (with itm's configs) knows the architecture; its config files answer without importing it."""
    import importlib.util

    found = importlib.util.find_spec("open_clip")
    folders = [CONFIG_DIR] + [Path(p) / "model_configs" for p in (found.submodule_search_locations or [])] \
        if found else [CONFIG_DIR]
    if any((folder / f"{name}.json").is_file() for folder in folders):
        return True
    return name in open_clip_registry().list_models()  # registered some other way


def claimed_identity(spec: ModelSpec, like: ModelIdentity) -> ModelIdentity:
    """The identity `spec` names, as far as its names and files tell without loading it; the shapes are
    taken from `like` (an index's model), which they match whenever the weights do."""
    checkpoint = str(Path(spec.checkpoint).resolve()) if spec.checkpoint and not spec.name else None
    return replace(like, arch=spec.arch, pretrained=spec.pretrained, name=spec.name, checkpoint=checkpoint,
                   checkpoint_sha256=file_sha256(spec.checkpoint) if spec.checkpoint else None)


def _bundle_spec(model: str, reranker: Path | None) -> ModelSpec:
    folder = Path(BUNDLES.get(model, model))
    manifest = folder / "bundle.json"
    if not manifest.is_file():
        raise UnknownModelError(
            f"model {model!r} is not available: {manifest} is missing "
            "(train it with `python -m itm.training.recipes.demo`)"
        )
    meta = json.loads(manifest.read_text())
    bundled = folder / meta["reranker"] if meta.get("reranker") else None
    return ModelSpec(meta["arch"], None, folder / meta["encoder"], reranker or bundled, name=model)
