"""Training the fusion reranker (encoders frozen by default) and, optionally, the dual encoders."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from itm.common.errors import ItmError
from itm.models.artifacts import write_card
from itm.models.checkpoint import file_sha256
from itm.models.encoder import DualEncoder, Encoded
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.models.fusion_checkpoint import load_reranker
from itm.models.registry import ModelSpec

from .batches import Row, batch_rows, false_captions, hard_image_rows, near_table, texts_of
from .caches import AUGMENT_VARIANTS, FrozenFeatures, ImageCache
from .data import ImageCaptions
from .evaluate import embed_dataset, rankings, recall, swap_scores
from .grounding import grounding_targets, phrase_word_targets, region_word_heads
from .loss import (
    ItmLoss,
    KnownNegatives,
    RegionWordHeads,
    region_word_loss,
    token_separation_loss,
)
from .options import TrainOptions, check_layers, check_precision, reader_config
from .state import ENCODER_FILE, RERANKER_FILE, STATE_FILE, RunLog, load_state, save_state, save_weights


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    reranker: Path | None  # the best on validation when validating, else the last
    encoder: Path | None
    losses: dict[str, float] = field(default_factory=dict)  # mean of each part over the last 50 steps
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    best_step: int | None = None  # step of the checkpoint chosen on validation
    validation: list[dict[str, float]] = field(default_factory=list)  # each validation's figures, with its step


def train(spec: ModelSpec, data: list[ImageCaptions], out_dir: Path | str, opts: TrainOptions | None = None,
          resume: bool = False, on_skip: Callable[[str, str], None] | None = None,
          val_data: list[ImageCaptions] | None = None, data_name: str | None = None) -> TrainResult:
    """Train on (image, captions) data; checkpoints go to out_dir, and `resume` continues from them.

    With `val_data` and opts.eval_every, the model is validated every eval_every steps; the best
    checkpoint (validation figure VAL_FIGURE) is kept in out_dir/best/, and opts.patience stops
    training once that many validations in a row bring no improvement. Every log_every steps the
    mean losses, and every validation's figures, are appended to out_dir/log.jsonl.

    >>> train(resolve_model("demo"), load_dataset("captions.jsonl"), "runs/r1", TrainOptions(epochs=2))
    """
    t0 = time.perf_counter()
    opts = opts or TrainOptions()
    if not opts.train_encoders and not opts.train_reranker:
        raise ItmError("nothing to train: enable the reranker or --train-encoders")
    check_precision(opts)
    if opts.more_negatives and not any(d.more_negatives for d in data):
        raise ItmError("more_negatives draws from the data's further false captions, and it names none "
                       "(a Karpathy sentence's \"more_negatives\" list)")
    out_dir = start_run(data, val_data, opts.eval_every, out_dir, opts.seed)
    resuming = resume and (out_dir / STATE_FILE).exists()
    # a resumed encoder run continues from its own last weights; the optimizer must hold those parameters
    encoder = DualEncoder.load(ModelSpec(spec.arch, checkpoint=out_dir / ENCODER_FILE)
                               if resuming and opts.train_encoders else spec, opts.device)
    reranker = _make_reranker(encoder, opts, out_dir, resume)
    token_layers = _token_layers(encoder, reranker, opts)
    heads = region_word_heads(encoder, reranker, data, opts)
    loss_fn = ItmLoss(opts.contrastive_weight, opts.matching_weight, opts.ranking_weight, opts.margin,
                      opts.num_negatives, opts.hard_negatives, random_negatives=opts.random_negatives,
                      grounding_weight=opts.grounding_weight).to(opts.device)
    groups = [{"params": list(loss_fn.parameters()), "lr": opts.lr}]
    for module in (reranker, heads):
        if module is not None:
            groups[0]["params"] += list(module.parameters())
    if opts.train_encoders:
        groups.append({"params": list(encoder.model.parameters()), "lr": opts.encoder_lr})
    optimizer = (adamw if opts.fused_optimizer else torch.optim.AdamW)(groups, weight_decay=opts.weight_decay)
    steps_per_epoch = max(1, len(data) // opts.batch_size)
    total = opts.max_steps or opts.epochs * steps_per_epoch
    end = min(total, opts.stop_after or total)
    state = load_state(out_dir, optimizer, loss_fn, heads) if resuming else {"step": 0}
    step, best = state["step"], state.get("best")
    bad_evals = state.get("bad_evals", 0)
    if not 0.0 <= opts.augment <= 1.0:
        raise ItmError(f"augment is the share of images degraded, between 0 and 1; got {opts.augment}")
    images = ImageCache(encoder, opts.workers, on_skip, variants=AUGMENT_VARIANTS if opts.augment else 0)
    frozen = None
    if reranker is not None and not opts.train_encoders and not opts.augment and opts.feature_cache_gb > 0:
        frozen = FrozenFeatures(encoder, images, reranker.cfg, opts.feature_cache_gb)
        frozen.fill([d.image for d in data], texts_of(data, negatives=opts.caption_negatives))
    near = near_table(encoder, images, data, opts)
    history: list[dict[str, float]] = []
    validation: list[dict[str, float]] = []
    log = RunLog(out_dir / "log.jsonl", opts.log_every, fresh=not resuming)
    bar = tqdm(total=end, initial=step, disable=not opts.progress, unit="step", desc="training")
    while step < end:
        epoch, index = divmod(step, steps_per_epoch)
        batch = batch_rows(data, opts.seed, epoch, index, opts.batch_size, near)
        _set_lr(optimizer, groups, opts, step, total)
        parts = _step(encoder, reranker, loss_fn, frozen or images, data, batch, opts, step, token_layers, heads)
        if parts is None:  # every image of the batch failed to load
            step += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 5.0)
        optimizer.step()
        step += 1
        history.append({k: float(v.detach()) for k, v in parts.items()})
        log.losses(step, history[-1])
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in history[-1].items()})
        stop = False
        if opts.eval_every and (step % opts.eval_every == 0 or step == end):
            figures = validate(encoder, reranker, val_data, opts.val_rerank_k if reranker is not None else 0)
            validation.append({"step": step, **figures})
            log.write({"step": step, "val": figures})
            if best is None or figures[VAL_FIGURE] > best["value"]:
                best, bad_evals = {"step": step, "value": figures[VAL_FIGURE]}, 0
                save_weights(out_dir / "best", encoder, reranker, opts, spec)
            else:
                bad_evals += 1
                stop = bool(opts.patience) and bad_evals >= opts.patience
        if step % opts.save_every == 0 or step == end or stop:
            save_state(out_dir, encoder, reranker, optimizer, loss_fn, heads, opts, spec,
                  {"step": step, "best": best, "bad_evals": bad_evals})
        if stop:
            break
    bar.close()
    recent = history[-50:]
    losses = {k: sum(h[k] for h in recent) / len(recent) for k in recent[0]} if recent else {}
    weights = out_dir / "best" if best is not None else out_dir
    if reranker is not None:  # what it was trained for and how well it did, beside it (models/artifacts.py)
        evaluation = next((v for v in validation if best and v["step"] == best["step"]), {})
        trained_encoder = weights / ENCODER_FILE if opts.train_encoders else None
        write_card(weights / RERANKER_FILE, model_card(encoder, reranker, opts, data, data_name, step, losses,
                                                      evaluation, trained_encoder))
    return TrainResult(out_dir, step, weights / RERANKER_FILE if reranker is not None else None,
                       weights / ENCODER_FILE if opts.train_encoders else None, losses, images.skipped,
                       time.perf_counter() - t0, best["step"] if best else None, validation)


def model_card(encoder: DualEncoder, reranker: FusionReranker, opts: TrainOptions, data: list[ImageCaptions],
               data_name: str | None, steps: int, losses: dict[str, float], evaluation: dict,
               trained_encoder: Path | None = None) -> dict:
    """The model card of a trained reranker: the encoder whose features it reads (the checkpoint trained beside
    it, when the run trained both), the data, the run, its last losses and its validation at the step kept."""
    who = encoder.identity
    pretrained, sha = (None, file_sha256(trained_encoder)) if trained_encoder else (who.pretrained,
                                                                                  who.checkpoint_sha256)
    return {"encoder": {"arch": who.arch, "pretrained": pretrained, "checkpoint_sha256": sha,
                        "embed_dim": who.embed_dim, "name": None if trained_encoder else who.name},
            "fusion": reranker.cfg.name,
            "data": {"name": data_name, "images": len(data), "captions": sum(len(d.captions) for d in data)},
            "steps": steps, "losses": losses, "evaluation": {k: v for k, v in evaluation.items() if k != "step"},
            "written": time.strftime("%Y-%m-%d")}


def start_run(data: list, val_data: list | None, eval_every: int, out_dir: Path | str, seed: int) -> Path:
    """Refuse a run without data, or asked to validate without validation data; make out_dir; seed torch."""
    if not data:
        raise ItmError("the training set is empty")
    if eval_every and not val_data:
        raise ItmError("validation was asked for, but the validation set is empty")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    return out_dir


VAL_FIGURE = "score"  # what picks the best checkpoint: RSUM, plus swap accuracy where the data has negatives


def validate(encoder: DualEncoder, reranker: FusionReranker | None, data: list[ImageCaptions],
             rerank_k: int = 0) -> dict[str, float]:
    """Recall figures on `data` (two-stage with `rerank_k` when a reranker is given), swap accuracy where
    the data has false captions, and "score": RSUM + swap accuracy, the figure checkpoints are chosen by."""
    return validate_weights(encoder, reranker, data, rerank_k)[None]


def validate_weights(encoder: DualEncoder, reranker: FusionReranker | None, data: list[ImageCaptions],
                     rerank_k: int = 0, weights: Sequence[float | None] = (None,)) -> dict[float | None, dict]:
    """`validate`'s figures for each score weight of the match logit (None: the reranker's own), from one
    pass of the encoders and the reranker over `data`."""
    was_training = encoder.model.training, reranker.training if reranker is not None else False
    encoder.model.eval()
    if reranker is not None:
        reranker.eval()
    try:
        feats = embed_dataset(encoder, reranker, data)
        all_ranks = rankings(feats, reranker, rerank_k, weights)
        negatives = [n for item in data for n in (item.negatives or (None,) * len(item.captions))]
        swaps = swap_scores(encoder, reranker, feats, negatives) if any(negatives) else None
    finally:
        encoder.model.train(was_training[0])
        if reranker is not None:
            reranker.train(was_training[1])
    out = {}
    for w, ranks in zip(weights, all_ranks):
        figures = recall(ranks)
        if swaps is not None:
            ok = swaps.fused(reranker, w) if reranker is not None else swaps.dual()
            figures["swap"] = 100 * float(ok.mean())
        figures["score"] = figures["rsum"] + figures.get("swap", 0.0)
        out[w] = figures
    return out


def _make_reranker(encoder: DualEncoder, opts: TrainOptions, out_dir: Path, resume: bool) -> FusionReranker | None:
    if not opts.train_reranker:
        return None
    if resume and (out_dir / RERANKER_FILE).exists():
        return load_reranker(out_dir / RERANKER_FILE, opts.device).train()
    if opts.init_reranker is not None:  # a fine-tune: its widths and layers must fit this encoder too
        reranker = load_reranker(opts.init_reranker, opts.device)
        cfg, what = reranker.cfg, str(opts.init_reranker)
        if (cfg.image_width, cfg.text_width) != (encoder.image_width, encoder.text_width):
            raise ItmError(f"{what} reads image/text tokens {cfg.image_width}/{cfg.text_width} wide, "
                           f"but the encoder's are {encoder.image_width}/{encoder.text_width}")
    else:
        cfg = get_fusion_config(opts.fusion, image_width=encoder.image_width, text_width=encoder.text_width)
        reranker, what = FusionReranker(cfg).to(opts.device), f"fusion config {cfg.name}"
    check_layers(what, cfg.image_layers, encoder.n_image_layers)
    check_layers(what, cfg.text_layers, encoder.n_text_layers)
    return reranker.train()


def _token_layers(encoder: DualEncoder, reranker: FusionReranker | None, opts: TrainOptions) -> tuple[int, ...]:
    """The text layers opts.token_margin keeps token negatives apart at: those the reranker reads (the one
    trained beside the encoders, else opts.fusion's); () when the margin is off."""
    if not opts.token_margin:
        return ()
    if opts.token_margin < 0 or not opts.train_encoders:
        raise ItmError(f"token_margin keeps the text tower's tokens apart: it is a positive distance and needs "
                       f"the encoders to train (got {opts.token_margin}, train_encoders={opts.train_encoders})")
    cfg = reader_config(encoder, reranker, opts)
    check_layers(f"fusion config {cfg.name}", cfg.text_layers, encoder.n_text_layers)
    return tuple(cfg.text_layers)


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with its fused kernel where this torch has one for the parameters' device.

    The default on a CPU updates each tensor in a Python loop, about a fifth of the fused kernel's speed and
    about a tenth of an encoder-training step here (benchmarks/optimizer_step.py). Same update up to rounding,
    and rounding is enough to move a long run elsewhere: training uses it only when asked
    (TrainOptions.fused_optimizer), so that a recipe's trajectory stays the one it was checked on.
    """
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or torch version
        return torch.optim.AdamW(params, **kwargs)


def _step(encoder: DualEncoder, reranker: FusionReranker | None, loss_fn: ItmLoss,
          images: "ImageCache | FrozenFeatures", data: list[ImageCaptions], batch: list[Row], opts: TrainOptions,
          step: int, token_layers: tuple[int, ...] = (),
          heads: RegionWordHeads | None = None) -> dict[str, torch.Tensor] | None:
    paths = [data[r.item].image for r in batch]
    if isinstance(images, FrozenFeatures):
        img, keep = images.encode_images(paths)
    else:
        pixels, keep = images.get(paths, augment=opts.augment, seed=opts.seed * 1_000_003 + step)
    if not keep:
        return None
    rows = [batch[i] for i in keep]
    captions = [data[r.item].captions[r.caption] for r in rows]
    false = false_captions(data, rows, opts, step)
    has_neg = torch.tensor([n is not None for column in false for n in column], dtype=torch.bool, device=opts.device)
    texts = captions + [n if n is not None else c for column in false
                        for n, c in zip(column, captions)]  # placeholders masked out
    image_ids = torch.tensor([r.item for r in rows], device=opts.device)
    grad = opts.train_encoders
    encoder.model.train(grad)
    texts = texts if has_neg.any() else captions
    apart = [(i, t) for i, r in enumerate(rows) if token_layers and data[r.item].token_negatives
             and (t := data[r.item].token_negatives[r.caption]) is not None]  # (caption row, its token negative)
    separation = torch.zeros((), device=opts.device) if token_layers else None  # a part of every step when on
    if isinstance(images, FrozenFeatures):
        txt = images.encode_texts(texts)
    else:
        ilayers = reranker.cfg.image_layers if reranker is not None else heads.layers if heads is not None else ()
        tlayers = reranker.cfg.text_layers if reranker is not None else token_layers
        img = encoder.encode_images(pixels, ilayers, grad=grad)
        txt = encoder.encode_texts(texts + [t for _, t in apart], tlayers, grad=grad)  # one call: one length
        if apart:
            n, near = len(texts), torch.tensor([i for i, _ in apart], device=opts.device)
            separation = token_separation_loss([t[near] for t in txt.tokens], [t[n:] for t in txt.tokens],
                                               txt.mask[near] & txt.mask[n:], opts.token_margin)
            txt = Encoded(txt.embeddings[:n], [t[:n] for t in txt.tokens], txt.mask[:n])
    words = None
    if heads is not None:  # the image tokens come from ilayers, which are heads.layers
        phrases = phrase_word_targets(encoder, heads, img.grid, data, rows, opts.device)
        words = (region_word_loss(img.tokens, heads, phrases) if phrases is not None
                 else torch.zeros((), device=opts.device)) * opts.region_words
    b = len(rows)
    # outputs of a frozen encoder are inference tensors: clone them so autograd may save them
    own = (lambda t: t) if grad or isinstance(images, FrozenFeatures) else (lambda t: t.clone())
    text_emb = own(txt.embeddings)
    known = KnownNegatives(text_emb=text_emb[b:], text_valid=has_neg) if has_neg.any() else KnownNegatives()
    if reranker is None:
        return _with_parts(loss_fn(None, None, None, None, own(img.embeddings), text_emb[:b],
                                   image_ids=image_ids, known=known), separation=separation, words=words)
    hard = hard_image_rows(data, rows) if opts.hard_images else None
    if hard is not None:
        known = replace(known, images=hard.to(opts.device))
    generator = torch.Generator(device=opts.device).manual_seed(opts.seed * 1_000_003 + step)
    grounding = grounding_targets(encoder, reranker.cfg, data, rows, opts.device) if opts.grounding_weight else None
    image_feats = reranker.encode_image_store([own(t) for t in img.tokens], img.grid)  # (B, Lv, Ti, D)
    text_feats, mask = reranker.encode_text_store([own(t) for t in txt.tokens], own(txt.mask))  # (B or 2B, ...)
    if has_neg.any():
        known = replace(known, text_feats=text_feats[b:], text_mask=mask[b:])
    # bf16: the fusion layers and losses only; the store projections in bf16 too were slower (casts of their output)
    with torch.autocast(torch.device(opts.device).type, torch.bfloat16, enabled=opts.precision == "bf16"):
        parts = loss_fn(reranker, image_feats, text_feats[:b], mask[:b], own(img.embeddings), text_emb[:b],
                        image_ids=image_ids, generator=generator, known=known, grounding=grounding)
    return _with_parts(parts, separation=separation, words=words)


def _with_parts(parts: dict[str, torch.Tensor], **extra: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The loss parts with the encoder-stage parts that are on (token separation, region words) added."""
    for name, value in extra.items():
        if value is not None:
            parts[name] = value
            parts["total"] = parts["total"] + value
    return parts


def _set_lr(optimizer, groups, opts: TrainOptions, step: int, total: int) -> None:
    warm = min(1.0, (step + 1) / max(1, opts.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))
    for g, base in zip(optimizer.param_groups, [opts.lr, opts.encoder_lr]):
        g["lr"] = base * warm * decay
