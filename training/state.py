"""What a run leaves on disk: weights, the train state a resumed run continues from, and its log."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from itm.common.errors import ItmError
from itm.models.checkpoint import load_checkpoint, save_checkpoint
from itm.models.encoder import DualEncoder, save_encoder
from itm.models.fusion import FusionReranker
from itm.models.fusion_checkpoint import save_reranker
from itm.models.registry import ModelSpec

from .loss import (
    ItmLoss,
    RegionWordHeads,
)
from .options import TrainOptions

STATE_KIND = "train_state"


RERANKER_FILE, ENCODER_FILE, STATE_FILE = "reranker.safetensors", "encoder.safetensors", "train_state.safetensors"


def save_weights(folder: Path, encoder: DualEncoder, reranker: FusionReranker | None, opts: TrainOptions,
                  spec: ModelSpec) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if reranker is not None:
        save_reranker(reranker, folder / RERANKER_FILE)
    if opts.train_encoders:
        save_encoder(encoder.model, spec.arch, folder / ENCODER_FILE)


def save_state(out_dir: Path, encoder: DualEncoder, reranker: FusionReranker | None, optimizer, loss_fn: ItmLoss,
          heads: RegionWordHeads | None, opts: TrainOptions, spec: ModelSpec, progress: dict) -> None:
    """The latest weights and everything a resumed run needs: optimizer, temperature, region-word heads,
    step, best so far."""
    save_weights(out_dir, encoder, reranker, opts, spec)
    state = optimizer.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    tensors["logit_scale"] = loss_fn.logit_scale.detach()
    if heads is not None:
        tensors.update({f"words.{k}": v for k, v in heads.state_dict().items()})
    save_checkpoint(tensors, {"kind": STATE_KIND, **progress, "param_groups": state["param_groups"],
                              "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}},
                    out_dir / STATE_FILE)


def load_state(out_dir: Path, optimizer, loss_fn: ItmLoss, heads: RegionWordHeads | None = None) -> dict:
    """Restore the optimizer, temperature and region-word heads; returns the saved progress (step, best,
    bad_evals)."""
    path = out_dir / STATE_FILE
    tensors, meta = load_checkpoint(path, STATE_KIND)
    saved = {k.removeprefix("words."): v for k, v in tensors.items() if k.startswith("words.")}
    if bool(saved) != (heads is not None):
        raise ItmError(f"{path} was saved {'with' if saved else 'without'} region-word heads; resume with the "
                       f"region_words it was trained with")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    with torch.no_grad():
        loss_fn.logit_scale.copy_(tensors["logit_scale"])
    if heads is not None:
        heads.load_state_dict(saved)
    return {"step": int(meta["step"]), "best": meta.get("best"), "bad_evals": int(meta.get("bad_evals", 0))}


class RunLog:
    """log.jsonl: mean losses every `every` steps, and validation figures, one JSON object per line."""

    def __init__(self, path: Path, every: int, fresh: bool):
        self.path, self.every = path, max(1, every)
        self.pending: list[dict[str, float]] = []
        if fresh:
            path.unlink(missing_ok=True)

    def losses(self, step: int, parts: dict[str, float]) -> None:
        self.pending.append(parts)
        if step % self.every == 0:
            mean = {k: sum(p[k] for p in self.pending) / len(self.pending) for k in self.pending[0]}
            self.write({"step": step, "loss": mean})
            self.pending = []

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
