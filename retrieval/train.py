"""Training the fusion reranker (encoders frozen by default) and, optionally, the dual encoders."""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from indexer.checkpoint import load_checkpoint, save_checkpoint
from indexer.encoder import DualEncoder, save_encoder
from indexer.errors import DecodeError, ItmError
from indexer.images import load_image
from indexer.models import ModelSpec
from indexer.pipeline import ordered_map

from .checkpoint import load_reranker, save_reranker
from .data import ImageCaptions
from .fusion import FusionReranker, get_fusion_config
from .loss import ItmLoss, contrastive_loss, positive_mask

STATE_KIND = "train_state"
RERANKER_FILE, ENCODER_FILE, STATE_FILE = "reranker.safetensors", "encoder.safetensors", "train_state.safetensors"


@dataclass
class TrainOptions:
    fusion: str = "fusion-base"  # fusion config name; widths are taken from the encoder
    epochs: int = 1
    max_steps: int | None = None  # the schedule's length in steps, whatever the epochs
    stop_after: int | None = None  # end early at this step; the learning-rate schedule still spans max_steps
    batch_size: int = 64
    lr: float = 3e-4  # reranker learning rate
    encoder_lr: float = 1e-5  # dual-encoder learning rate, when they train
    weight_decay: float = 0.05
    warmup_steps: int = 50
    train_encoders: bool = False  # fine-tune the dual encoders too (contrastive loss)
    train_reranker: bool = True  # False: encoders alone, contrastive loss only
    contrastive_weight: float = 1.0
    matching_weight: float = 1.0
    ranking_weight: float = 1.0
    margin: float = 1.0  # ranking margin, in match-logit units
    num_negatives: int = 2  # hard negatives mined per image and per text
    hard_negatives: str = "sample"  # "sample" (softmax of similarity) or "hardest"
    neighbours: int = 0  # batch each image with its N nearest images (frozen encoders), so in-batch negatives confuse
    seed: int = 0
    device: str = "cpu"
    workers: int = 2  # image decoding threads
    save_every: int = 200  # steps between checkpoints
    progress: bool = False


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    reranker: Path | None
    encoder: Path | None
    losses: dict[str, float] = field(default_factory=dict)  # mean of each part over the last 50 steps
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def train(spec: ModelSpec, data: list[ImageCaptions], out_dir: Path | str, opts: TrainOptions | None = None,
          resume: bool = False, on_skip: Callable[[str, str], None] | None = None) -> TrainResult:
    """Train on (image, captions) data; checkpoints go to out_dir, and `resume` continues from them.

    >>> train(resolve_model("demo"), load_dataset("captions.jsonl"), "runs/r1", TrainOptions(epochs=2))
    """
    t0 = time.perf_counter()
    opts = opts or TrainOptions()
    if not opts.train_encoders and not opts.train_reranker:
        raise ItmError("nothing to train: enable the reranker or --train-encoders")
    if not data:
        raise ItmError("the training set is empty")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    resuming = resume and (out_dir / STATE_FILE).exists()
    # a resumed encoder run continues from its own last weights; the optimizer must hold those parameters
    encoder = DualEncoder.load(ModelSpec(spec.arch, checkpoint=out_dir / ENCODER_FILE)
                               if resuming and opts.train_encoders else spec, opts.device)
    reranker = _make_reranker(encoder, opts, out_dir, resume)
    loss_fn = ItmLoss(opts.contrastive_weight, opts.matching_weight, opts.ranking_weight, opts.margin,
                      opts.num_negatives, opts.hard_negatives).to(opts.device)
    groups = [{"params": list(loss_fn.parameters()), "lr": opts.lr}]
    if reranker is not None:
        groups[0]["params"] += list(reranker.parameters())
    if opts.train_encoders:
        groups.append({"params": list(encoder.model.parameters()), "lr": opts.encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=opts.weight_decay)
    steps_per_epoch = max(1, len(data) // opts.batch_size)
    total = opts.max_steps or opts.epochs * steps_per_epoch
    end = min(total, opts.stop_after or total)
    step = _load_state(out_dir, optimizer, loss_fn) if resuming else 0
    images = _ImageCache(encoder, opts.workers, on_skip)
    near = _neighbour_table(encoder, images, data, opts) if opts.neighbours else None
    history: list[dict[str, float]] = []
    bar = tqdm(total=end, initial=step, disable=not opts.progress, unit="step", desc="training")
    while step < end:
        epoch, index = divmod(step, steps_per_epoch)
        batch = _batch(data, opts.seed, epoch, index, opts.batch_size, near)
        _set_lr(optimizer, groups, opts, step, total)
        parts = _step(encoder, reranker, loss_fn, images, batch, opts, step)
        if parts is None:  # every image of the batch failed to load
            step += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 5.0)
        optimizer.step()
        step += 1
        history.append({k: float(v.detach()) for k, v in parts.items()})
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in history[-1].items()})
        if step % opts.save_every == 0 or step == end:
            _save(out_dir, encoder, reranker, optimizer, loss_fn, step, opts, spec)
    bar.close()
    recent = history[-50:]
    losses = {k: sum(h[k] for h in recent) / len(recent) for k in recent[0]} if recent else {}
    return TrainResult(out_dir, step, out_dir / RERANKER_FILE if reranker is not None else None,
                       out_dir / ENCODER_FILE if opts.train_encoders else None, losses, images.skipped,
                       time.perf_counter() - t0)


def _make_reranker(encoder: DualEncoder, opts: TrainOptions, out_dir: Path, resume: bool) -> FusionReranker | None:
    if not opts.train_reranker:
        return None
    if resume and (out_dir / RERANKER_FILE).exists():
        return load_reranker(out_dir / RERANKER_FILE, opts.device).train()
    cfg = get_fusion_config(opts.fusion, image_width=encoder.image_width, text_width=encoder.text_width)
    for layers, n in ((cfg.image_layers, encoder.n_image_layers), (cfg.text_layers, encoder.n_text_layers)):
        if any(not -n <= i < n for i in layers):
            raise ItmError(f"fusion config {cfg.name} reads layers {list(layers)}, but the encoder tower has {n}")
    return FusionReranker(cfg).to(opts.device).train()


def _batch(data: list[ImageCaptions], seed: int, epoch: int, index: int, size: int,
           near: torch.Tensor | None = None) -> list[tuple[Path, str]]:
    """The index-th batch of an epoch: a seeded permutation of images, one seeded caption each.

    With a neighbour table, each anchor brings its nearest images along (fewer anchors per batch).
    """
    order = list(range(len(data)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    rng = random.Random(seed * 7_919 + epoch * 104_729 + index)
    if near is None:
        chosen = order[index * size:(index + 1) * size]
    else:
        per = size // (1 + near.shape[1])
        groups = ([a, *near[a].tolist()] for a in order[index * per:(index + 1) * per])
        chosen = list(dict.fromkeys(i for g in groups for i in g))[:size]
    return [(data[i].image, rng.choice(data[i].captions)) for i in chosen]


def _neighbour_table(encoder: DualEncoder, images: "_ImageCache", data: list[ImageCaptions],
                     opts: TrainOptions, chunk: int = 256) -> torch.Tensor:
    """(N, neighbours) indices of each image's nearest other images by frozen dual-encoder similarity."""
    if opts.train_encoders:
        raise ItmError("--neighbours needs frozen encoders: their similarity must not drift during training")
    emb = []
    for s in range(0, len(data), chunk):
        pixels, keep = images.get([d.image for d in data[s:s + chunk]])
        out = torch.zeros(len(data[s:s + chunk]), encoder.embed_dim)
        if keep:
            out[keep] = encoder.encode_images(pixels).embeddings.cpu()
        emb.append(out)
    emb = torch.cat(emb)  # (N, E); images that failed to load are zero vectors, nobody's neighbour
    near = []
    for s in range(0, len(emb), chunk):
        sim = emb[s:s + chunk] @ emb.T  # (chunk, N)
        sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = -2  # not your own neighbour
        near.append(sim.topk(opts.neighbours, dim=1).indices)
    return torch.cat(near)


def _step(encoder: DualEncoder, reranker: FusionReranker | None, loss_fn: ItmLoss, images: "_ImageCache",
          batch: list[tuple[Path, str]], opts: TrainOptions, step: int) -> dict[str, torch.Tensor] | None:
    pixels, keep = images.get([p for p, _ in batch])
    if not keep:
        return None
    captions = [batch[i][1] for i in keep]
    image_ids = torch.tensor([hash(batch[i][0]) for i in keep], device=opts.device)
    grad = opts.train_encoders
    encoder.model.train(grad)
    ilayers = reranker.cfg.image_layers if reranker is not None else ()
    tlayers = reranker.cfg.text_layers if reranker is not None else ()
    img = encoder.encode_images(pixels, ilayers, grad=grad)
    txt = encoder.encode_texts(captions, tlayers, grad=grad)
    if reranker is None:
        positives = positive_mask(len(keep), image_ids, device=opts.device)
        c = contrastive_loss(loss_fn.scale * img.embeddings @ txt.embeddings.T, positives)
        return {"contrastive": c, "total": c}
    # tokens from a frozen encoder are inference tensors: clone them so autograd may save them
    itok = img.tokens if grad else [t.clone() for t in img.tokens]
    ttok = txt.tokens if grad else [t.clone() for t in txt.tokens]
    image_feats = reranker.encode_image_store(itok, img.grid)  # (B, Lv, Ti, D)
    text_feats, mask = reranker.encode_text_store(ttok, txt.mask.clone())  # (B, Lt, Tt, D), (B, Tt)
    generator = torch.Generator(device=opts.device).manual_seed(opts.seed * 1_000_003 + step)
    return loss_fn(reranker, image_feats, text_feats, mask, img.embeddings.clone(), txt.embeddings.clone(),
                   image_ids=image_ids, generator=generator)


class _ImageCache:
    """Decoded, preprocessed training images, kept in memory as fp16 (small datasets fit)."""

    def __init__(self, encoder: DualEncoder, workers: int, on_skip, max_items: int = 50_000):
        self.encoder, self.workers, self.on_skip, self.max_items = encoder, workers, on_skip, max_items
        self.cache: dict[Path, torch.Tensor | None] = {}
        self.skipped: list[str] = []

    def _load(self, path: Path) -> torch.Tensor | None:
        try:
            return self.encoder.prepare(load_image(path, min_side=self.encoder.image_size)).half()
        except DecodeError as e:
            self.skipped.append(str(path))
            if self.on_skip:
                self.on_skip(str(path), str(e))
            return None

    def get(self, paths: list[Path]) -> tuple[torch.Tensor, list[int]]:
        missing = [p for p in dict.fromkeys(paths) if p not in self.cache]
        loaded = dict(zip(missing, ordered_map(self._load, missing, self.workers, prefetch=len(missing) or 1)))
        for p, x in loaded.items():
            if len(self.cache) < self.max_items or x is None:  # failures are remembered, never retried
                self.cache[p] = x
        tensors = [self.cache[p] if p in self.cache else loaded[p] for p in paths]
        keep = [i for i, x in enumerate(tensors) if x is not None]
        stacked = torch.stack([tensors[i] for i in keep]).float() if keep else torch.empty(0)
        return stacked, keep


def _set_lr(optimizer, groups, opts: TrainOptions, step: int, total: int) -> None:
    warm = min(1.0, (step + 1) / max(1, opts.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))
    for g, base in zip(optimizer.param_groups, [opts.lr, opts.encoder_lr]):
        g["lr"] = base * warm * decay


def _save(out_dir: Path, encoder: DualEncoder, reranker: FusionReranker | None, optimizer, loss_fn: ItmLoss,
          step: int, opts: TrainOptions, spec: ModelSpec) -> None:
    if reranker is not None:
        save_reranker(reranker, out_dir / RERANKER_FILE)
    if opts.train_encoders:
        save_encoder(encoder.model, spec.arch, out_dir / ENCODER_FILE)
    state = optimizer.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    tensors["logit_scale"] = loss_fn.logit_scale.detach()
    save_checkpoint(tensors, {"kind": STATE_KIND, "step": step, "param_groups": state["param_groups"],
                              "options": asdict(opts)}, out_dir / STATE_FILE)


def _load_state(out_dir: Path, optimizer, loss_fn: ItmLoss) -> int:
    path = out_dir / STATE_FILE
    if not path.exists():
        return 0
    tensors, meta = load_checkpoint(path, STATE_KIND)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    with torch.no_grad():
        loss_fn.logit_scale.copy_(tensors["logit_scale"])
    return int(meta["step"])
