"""Teaching an image tower to see through re-encoding: feature distillation from its own clean self.

A model trained on clean images loses points on photos that were shrunk and re-compressed on the
way, because their features drift from the clean image's. `harden_images` fine-tunes the image
tower alone so that a degraded copy (`itm.training.train.degrade`: JPEG at quality 40..95, half the
time shrunk first) gives the features the frozen original gives the clean image: its pooled
embedding and the token features of the layers a reranker reads. Clean images are held to their
own features too. The text tower is not touched, so indexed texts keep their embeddings, and a
reranker trained on the original encoder reads the new one's tokens without retraining.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from itm.common.errors import ItmError
from itm.models.encoder import DualEncoder, Encoded, save_encoder
from itm.models.registry import ModelSpec

from .caches import AUGMENT_VARIANTS, ImageCache
from .data import ImageCaptions
from .options import check_layers
from .state import ENCODER_FILE, RunLog
from .train import start_run

VAL_SEED = 7919  # which degraded copy of each validation image is measured: the same one at every validation


@dataclass
class HardenOptions:
    layers: tuple[int, ...] = (-3, -2, -1)  # image token layers held to the original's (a reranker's image_layers)
    steps: int = 1500
    batch_size: int = 128  # images per step; each is shown degraded and clean
    lr: float = 2e-4
    warmup_steps: int = 50
    embedding_weight: float = 10.0  # weight of (1 - cosine) between the pooled embeddings, beside the token error
    eval_every: int = 250  # steps between validations (the feature error on the validation images)
    seed: int = 0
    device: str = "cpu"
    workers: int = 2
    log_every: int = 10
    progress: bool = False


@dataclass
class HardenResult:
    out_dir: Path
    steps: int
    encoder: Path  # the best on validation when validating, else the last
    best_step: int | None = None
    seconds: float = 0.0
    validation: list[dict[str, float]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def harden_images(spec: ModelSpec, data: list[ImageCaptions], out_dir: Path | str, opts: HardenOptions | None = None,
                  val_data: list[ImageCaptions] | None = None,
                  on_skip: Callable[[str, str], None] | None = None) -> HardenResult:
    """Fine-tune the image tower of `spec` on the images of `data`; the encoder goes to out_dir/encoder.safetensors
    and, with `val_data`, the one with the lowest validation error to out_dir/best/. out_dir/log.jsonl holds the
    losses and each validation's error on clean and on degraded images ("clean", "degraded", and their sum "error")."""
    t0 = time.perf_counter()
    opts = opts or HardenOptions()
    out_dir = start_run(data, val_data, opts.eval_every, out_dir, opts.seed)
    teacher = DualEncoder.load(spec, opts.device)
    student = copy.deepcopy(teacher)  # the same weights, even where the spec's are drawn at random
    check_layers("hardening", opts.layers, student.n_image_layers)
    for name, p in student.model.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    params = [p for p in student.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    images = ImageCache(teacher, opts.workers, on_skip, variants=AUGMENT_VARIANTS)
    val_images = ImageCache(teacher, opts.workers, on_skip, variants=AUGMENT_VARIANTS)
    paths = list(dict.fromkeys(d.image for d in data))
    val_paths = list(dict.fromkeys(d.image for d in val_data or ()))
    log = RunLog(out_dir / "log.jsonl", opts.log_every, fresh=True)
    order: list[Path] = []
    rng = random.Random(opts.seed)
    best, validation = None, []

    def check(step: int) -> None:  # validate; keep the weights with the lowest error so far in out_dir/best
        nonlocal best
        figures = _validate(teacher, student, val_images, val_paths, opts)
        validation.append({"step": step, **figures})
        log.write({"step": step, "val": figures})
        if best is None or figures["error"] < best["value"]:
            best = {"step": step, "value": figures["error"]}
            _save(student, spec, out_dir / "best")

    if opts.eval_every:
        check(0)
    bar = tqdm(total=opts.steps, disable=not opts.progress, unit="step", desc="hardening")
    for step in range(1, opts.steps + 1):
        if len(order) < opts.batch_size:  # shuffled epochs of the images, one after another
            order += rng.sample(paths, len(paths))
        batch, order = order[:opts.batch_size], order[opts.batch_size:]
        clean, keep = images.get(batch)
        if not keep:
            continue
        degraded, _ = images.get([batch[i] for i in keep], augment=1.0, seed=opts.seed * 1_000_003 + step)
        warm = min(1.0, step / max(1, opts.warmup_steps))
        for g in optimizer.param_groups:
            g["lr"] = opts.lr * warm * 0.5 * (1 + math.cos(math.pi * step / opts.steps))
        target = teacher.encode_images(clean, opts.layers)
        student.model.train()
        parts = _error(student.encode_images(torch.cat([degraded, clean]), opts.layers, grad=True),
                       _twice(target), opts)
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        optimizer.step()
        log.losses(step, {k: float(v.detach()) for k, v in parts.items()})
        bar.update(1)
        if opts.eval_every and (step % opts.eval_every == 0 or step == opts.steps):
            check(step)
    bar.close()
    last = _save(student, spec, out_dir)
    return HardenResult(out_dir, opts.steps, out_dir / "best" / ENCODER_FILE if best else last,
                        best["step"] if best else None, time.perf_counter() - t0, validation,
                        images.skipped + val_images.skipped)


def _error(student: Encoded, teacher: Encoded, opts: HardenOptions) -> dict[str, torch.Tensor]:
    """Token error (squared error over the teacher's variance, summed over layers) and embedding error."""
    tokens = sum(((s - t) ** 2).mean() / t.var() for s, t in zip(student.tokens, teacher.tokens))
    embedding = (1 - (student.embeddings * teacher.embeddings).sum(-1)).mean()
    return {"tokens": tokens, "embedding": embedding, "total": tokens + opts.embedding_weight * embedding}


def _twice(e: Encoded) -> Encoded:
    return Encoded(torch.cat([e.embeddings, e.embeddings]), [torch.cat([t, t]) for t in e.tokens])


@torch.no_grad()
def _validate(teacher: DualEncoder, student: DualEncoder, images: ImageCache, paths: list[Path],
              opts: HardenOptions, chunk: int = 256) -> dict[str, float]:
    """Mean weighted error of the student against the teacher's clean features, on clean and on degraded images."""
    student.model.eval()
    sums, count = {"clean": 0.0, "degraded": 0.0}, 0
    for i in range(0, len(paths), chunk):
        clean, keep = images.get(paths[i:i + chunk])
        if not keep:
            continue
        part = [paths[i + j] for j in keep]
        target = teacher.encode_images(clean, opts.layers)
        for name, x in (("clean", clean), ("degraded", images.get(part, augment=1.0, seed=VAL_SEED + i)[0])):
            sums[name] += float(_error(student.encode_images(x, opts.layers), target, opts)["total"]) * len(keep)
        count += len(keep)
    if not count:
        raise ItmError("no validation image could be read")
    out = {k: v / count for k, v in sums.items()}
    return {**out, "error": out["clean"] + out["degraded"]}


def _save(student: DualEncoder, spec: ModelSpec, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return save_encoder(student.model, spec.arch, folder / ENCODER_FILE)
