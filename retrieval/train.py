"""Training the fusion reranker (encoders frozen by default) and, optionally, the dual encoders."""
from __future__ import annotations

import functools
import io
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from indexer.changes import content_hash
from indexer.checkpoint import load_checkpoint, save_checkpoint
from indexer.encoder import DualEncoder, Encoded, bf16_is_emulated, save_encoder
from indexer.errors import DecodeError, ItmError, ItmWarning
from indexer.images import load_image, read_file
from indexer.models import ModelSpec
from indexer.parallel import ordered_map

from .checkpoint import load_reranker, save_reranker
from .data import ImageCaptions, Phrase
from .evaluate import embed_dataset, rankings, recall, swap_scores
from .fusion import FusionReranker, get_fusion_config
from .loss import (Grounding, ItmLoss, KnownNegatives, PhraseWords, RegionWordHeads, region_word_loss,
                   token_separation_loss)

STATE_KIND = "train_state"
AUGMENT_VARIANTS = 3  # degraded copies made of each training image, when augmenting
RERANKER_FILE, ENCODER_FILE, STATE_FILE = "reranker.safetensors", "encoder.safetensors", "train_state.safetensors"


@dataclass
class TrainOptions:
    fusion: str = "fusion-base"  # fusion config name; widths are taken from the encoder
    init_reranker: Path | None = None  # start from these reranker weights (a fine-tune) instead of random ones
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
    random_negatives: int = 1  # negatives drawn uniformly per image and per text, beside the mined ones
    neighbours: int = 0  # batch each image with its N nearest images (frozen encoders), so in-batch negatives confuse
    caption_negatives: bool = True  # use the data's false captions as negatives (contrastive, matching, ranking)
    more_negatives: int = 0  # and this many more per caption, drawn each step from the data's more_negatives
    hard_images: bool = True  # batch each image with the confusable images the data names, as negatives of its captions
    augment: float = 0.0  # share of training images seen as one of their AUGMENT_VARIANTS degraded copies (`degrade`)
    precision: str = "fp32"  # "bf16": the fusion layers and losses under bf16 autocast (weights, store projections fp32)
    grounding_weight: float = 1.0  # weight of the grounding loss, for data whose captions ground phrases in boxes
    # encoder training: each caption's text tokens stay at least this cosine distance from its token negative's
    # (ImageCaptions.token_negatives) at every text layer of the fusion config, where they differ most (0: off)
    token_margin: float = 0.0
    # encoder training: weight of the region-word loss (loss.region_word_loss), for data whose captions ground
    # phrases in boxes: each phrase's words read from its box's image tokens at the fusion config's image layers
    region_words: float = 0.0
    fused_optimizer: bool = False  # AdamW's fused kernel (`adamw`): faster on a CPU, and a run's trajectory differs
    eval_every: int = 0  # steps between validations on the validation data (0: none)
    patience: int = 0  # stop after this many validations without a better figure (0: never early)
    val_rerank_k: int = 10  # candidates reranked when validating a reranker
    seed: int = 0
    device: str = "cpu"
    workers: int = 2  # image decoding threads
    feature_cache_gb: float = 4.0  # frozen encoders: keep each image's and text's features, up to this size (0: off)
    save_every: int = 200  # steps between checkpoints
    log_every: int = 10  # steps averaged per line of log.jsonl
    progress: bool = False


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


@dataclass(frozen=True)
class _Row:
    item: int  # index into the data
    caption: int  # which of its captions


def train(spec: ModelSpec, data: list[ImageCaptions], out_dir: Path | str, opts: TrainOptions | None = None,
          resume: bool = False, on_skip: Callable[[str, str], None] | None = None,
          val_data: list[ImageCaptions] | None = None) -> TrainResult:
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
    out_dir = _start_run(data, val_data, opts.eval_every, out_dir, opts.seed)
    resuming = resume and (out_dir / STATE_FILE).exists()
    # a resumed encoder run continues from its own last weights; the optimizer must hold those parameters
    encoder = DualEncoder.load(ModelSpec(spec.arch, checkpoint=out_dir / ENCODER_FILE)
                               if resuming and opts.train_encoders else spec, opts.device)
    reranker = _make_reranker(encoder, opts, out_dir, resume)
    token_layers = _token_layers(encoder, reranker, opts)
    heads = _region_word_heads(encoder, reranker, data, opts)
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
    state = _load_state(out_dir, optimizer, loss_fn, heads) if resuming else {"step": 0}
    step, best = state["step"], state.get("best")
    bad_evals = state.get("bad_evals", 0)
    if not 0.0 <= opts.augment <= 1.0:
        raise ItmError(f"augment is the share of images degraded, between 0 and 1; got {opts.augment}")
    images = _ImageCache(encoder, opts.workers, on_skip, variants=AUGMENT_VARIANTS if opts.augment else 0)
    frozen = None
    if reranker is not None and not opts.train_encoders and not opts.augment and opts.feature_cache_gb > 0:
        frozen = _FrozenFeatures(encoder, images, reranker.cfg, opts.feature_cache_gb)
        frozen.fill([d.image for d in data], texts_of(data, negatives=opts.caption_negatives))
    near = _near_table(encoder, images, data, opts)
    history: list[dict[str, float]] = []
    validation: list[dict[str, float]] = []
    log = _Log(out_dir / "log.jsonl", opts.log_every, fresh=not resuming)
    bar = tqdm(total=end, initial=step, disable=not opts.progress, unit="step", desc="training")
    while step < end:
        epoch, index = divmod(step, steps_per_epoch)
        batch = _batch(data, opts.seed, epoch, index, opts.batch_size, near)
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
                _save_weights(out_dir / "best", encoder, reranker, opts, spec)
            else:
                bad_evals += 1
                stop = bool(opts.patience) and bad_evals >= opts.patience
        if step % opts.save_every == 0 or step == end or stop:
            _save(out_dir, encoder, reranker, optimizer, loss_fn, heads, opts, spec,
                  {"step": step, "best": best, "bad_evals": bad_evals})
        if stop:
            break
    bar.close()
    recent = history[-50:]
    losses = {k: sum(h[k] for h in recent) / len(recent) for k in recent[0]} if recent else {}
    weights = out_dir / "best" if best is not None else out_dir
    return TrainResult(out_dir, step, weights / RERANKER_FILE if reranker is not None else None,
                       weights / ENCODER_FILE if opts.train_encoders else None, losses, images.skipped,
                       time.perf_counter() - t0, best["step"] if best else None, validation)


def _start_run(data: list, val_data: list | None, eval_every: int, out_dir: Path | str, seed: int) -> Path:
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
    cfg = _reader_config(encoder, reranker, opts)
    check_layers(f"fusion config {cfg.name}", cfg.text_layers, encoder.n_text_layers)
    return tuple(cfg.text_layers)


def _reader_config(encoder: DualEncoder, reranker: FusionReranker | None, opts: TrainOptions):
    """The fusion config whose layers the encoder-stage losses shape: the reranker's trained beside the
    encoders, else opts.fusion's."""
    return reranker.cfg if reranker is not None else get_fusion_config(
        opts.fusion, image_width=encoder.image_width, text_width=encoder.text_width)


def _region_word_heads(encoder: DualEncoder, reranker: FusionReranker | None, data: list[ImageCaptions],
                       opts: TrainOptions) -> RegionWordHeads | None:
    """The word classifiers of opts.region_words, over every token id of the data's grounded phrases, at
    the image layers the reranker reads; None when the loss is off."""
    if not opts.region_words:
        return None
    if opts.region_words < 0 or not opts.train_encoders:
        raise ItmError(f"region_words shapes the image tower: it is a positive weight and needs the encoders "
                       f"to train (got {opts.region_words}, train_encoders={opts.train_encoders})")
    vocabulary = sorted({t for d in data for text, phrases in zip(d.captions, d.phrases) for p in phrases
                         for t in phrase_words(encoder.tokenizer, text, p)})
    if not vocabulary:
        raise ItmError("region_words reads grounded phrases, and the data grounds none (a Karpathy "
                       "sentence's \"phrases\")")
    cfg = _reader_config(encoder, reranker, opts)
    check_layers(f"fusion config {cfg.name}", cfg.image_layers, encoder.n_image_layers)
    return RegionWordHeads(tuple(vocabulary), tuple(cfg.image_layers), encoder.image_width).to(opts.device)


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


TRAIN_PRECISIONS = ("fp32", "bf16")


def check_precision(opts: TrainOptions) -> None:
    """Refuse a precision training does not offer; warn where bf16 would be emulated (slower, not faster)."""
    if opts.precision not in TRAIN_PRECISIONS:
        raise ItmError(f"training precision is one of {', '.join(TRAIN_PRECISIONS)}, not {opts.precision!r}")
    if opts.precision == "bf16" and not opts.train_reranker:
        raise ItmError("bf16 speeds up the reranker's training; encoders train in fp32 (use --precision fp32)")
    if opts.precision == "bf16" and bf16_is_emulated(opts.device):
        warnings.warn("this CPU has no native bf16 arithmetic (AVX-512 BF16 or AMX): bf16 training runs slower "
                      "than fp32 here", ItmWarning, stacklevel=3)


def check_layers(what: str, layers, n: int) -> None:
    """Refuse layer indices (negative ones count from the end) that a tower of `n` layers does not have."""
    if any(not -n <= i < n for i in layers):
        raise ItmError(f"{what} reads layers {list(layers)}, but the encoder tower has {n}")


def _batch(data: list[ImageCaptions], seed: int, epoch: int, index: int, size: int,
           near: list[list[int]] | None = None) -> list[_Row]:
    """The index-th batch of an epoch: a seeded permutation of images, one seeded caption each.

    With a table of confusable images, each anchor brings them along (fewer anchors per batch).
    """
    order = list(range(len(data)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    rng = random.Random(seed * 7_919 + epoch * 104_729 + index)
    if near is None:
        chosen = order[index * size:(index + 1) * size]
    else:
        per = max(1, size // (1 + max(map(len, near), default=0)))
        groups = ([a, *near[a]] for a in order[index * per:(index + 1) * per])
        chosen = list(dict.fromkeys(i for g in groups for i in g))[:size]
    return [_Row(i, rng.randrange(len(data[i].captions))) for i in chosen]


def _near_table(encoder: DualEncoder, images: "_ImageCache", data: list[ImageCaptions],
                opts: TrainOptions) -> list[list[int]] | None:
    """Per image, the images to batch it with: the data's confusable images and/or its nearest ones."""
    named = None
    if opts.hard_images and any(d.hard_images for d in data):
        where = {d.image: i for i, d in enumerate(data)}
        named = [[where[p] for p in d.hard_images if p in where] for d in data]
    if not opts.neighbours:
        return named
    nearest = _neighbour_table(encoder, images, data, opts).tolist()
    if named is None:
        return nearest
    return [list(dict.fromkeys(a + b))[:max(1, opts.neighbours)] for a, b in zip(named, nearest)]


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


def _step(encoder: DualEncoder, reranker: FusionReranker | None, loss_fn: ItmLoss,
          images: "_ImageCache | _FrozenFeatures", data: list[ImageCaptions], batch: list[_Row], opts: TrainOptions,
          step: int, token_layers: tuple[int, ...] = (),
          heads: RegionWordHeads | None = None) -> dict[str, torch.Tensor] | None:
    paths = [data[r.item].image for r in batch]
    if isinstance(images, _FrozenFeatures):
        img, keep = images.encode_images(paths)
    else:
        pixels, keep = images.get(paths, augment=opts.augment, seed=opts.seed * 1_000_003 + step)
    if not keep:
        return None
    rows = [batch[i] for i in keep]
    captions = [data[r.item].captions[r.caption] for r in rows]
    false = _false_captions(data, rows, opts, step)
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
    if isinstance(images, _FrozenFeatures):
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
        phrases = _phrase_words(encoder, heads, img.grid, data, rows, opts.device)
        words = (region_word_loss(img.tokens, heads, phrases) if phrases is not None
                 else torch.zeros((), device=opts.device)) * opts.region_words
    b = len(rows)
    # outputs of a frozen encoder are inference tensors: clone them so autograd may save them
    own = (lambda t: t) if grad or isinstance(images, _FrozenFeatures) else (lambda t: t.clone())
    text_emb = own(txt.embeddings)
    known = KnownNegatives(text_emb=text_emb[b:], text_valid=has_neg) if has_neg.any() else KnownNegatives()
    if reranker is None:
        return _with_parts(loss_fn(None, None, None, None, own(img.embeddings), text_emb[:b],
                                   image_ids=image_ids, known=known), separation=separation, words=words)
    hard = _hard_image_rows(data, rows) if opts.hard_images else None
    if hard is not None:
        known = replace(known, images=hard.to(opts.device))
    generator = torch.Generator(device=opts.device).manual_seed(opts.seed * 1_000_003 + step)
    grounding = _grounding(encoder, reranker.cfg, data, rows, opts.device) if opts.grounding_weight else None
    image_feats = reranker.encode_image_store([own(t) for t in img.tokens], img.grid)  # (B, Lv, Ti, D)
    text_feats, mask = reranker.encode_text_store([own(t) for t in txt.tokens], own(txt.mask))  # (B or 2B, ...)
    if has_neg.any():
        known = replace(known, text_feats=text_feats[b:], text_mask=mask[b:])
    # bf16: the fusion layers and losses only; the store projections in bf16 too were slower (casts of their output)
    with torch.autocast(torch.device(opts.device).type, torch.bfloat16, enabled=opts.precision == "bf16"):
        parts = loss_fn(reranker, image_feats, text_feats[:b], mask[:b], own(img.embeddings), text_emb[:b],
                        image_ids=image_ids, generator=generator, known=known, grounding=grounding)
    return _with_parts(parts, separation=separation, words=words)


def _false_captions(data: list[ImageCaptions], rows: list[_Row], opts: TrainOptions,
                    step: int) -> list[list[str | None]]:
    """The batch captions' named false captions, in columns of one per row (None where a row has none): the
    data's hard negative, then opts.more_negatives drawn (seeded by the step) from its more_negatives."""
    if not opts.caption_negatives:
        return []
    columns = [[data[r.item].negatives[r.caption] if data[r.item].negatives else None for r in rows]]
    if opts.more_negatives:
        rng, k = random.Random(opts.seed * 1_000_003 + step), opts.more_negatives
        drawn = []
        for r in rows:
            pool = data[r.item].more_negatives[r.caption] if data[r.item].more_negatives else ()
            picked = rng.sample(pool, min(k, len(pool)))
            drawn.append(picked + [None] * (k - len(picked)))
        columns += [list(c) for c in zip(*drawn)]
    return columns


def _with_parts(parts: dict[str, torch.Tensor], **extra: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The loss parts with the encoder-stage parts that are on (token separation, region words) added."""
    for name, value in extra.items():
        if value is not None:
            parts[name] = value
            parts["total"] = parts["total"] + value
    return parts


def _phrase_words(encoder: DualEncoder, heads: RegionWordHeads, grid: tuple[int, int], data: list[ImageCaptions],
                  rows: list[_Row], device: str) -> PhraseWords | None:
    """The batch captions' grounded phrases: each one's box share of the image tokens, and its words."""
    if grid[0] != grid[1]:
        raise ItmError(f"region_words pools a square grid of image tokens; this tower's is {grid[0]} x {grid[1]}")
    pairs, shares, words = [], [], []
    for i, text, phrase, share in _grounded_phrases(data, rows, grid[0]):
        pairs.append(i)
        shares.append(share)
        hot = torch.zeros(len(heads.vocabulary))
        hot[[heads.index[t] for t in phrase_words(encoder.tokenizer, text, phrase) if t in heads.index]] = 1
        words.append(hot)
    if not pairs:
        return None
    return PhraseWords(torch.tensor(pairs, device=device), torch.stack(shares).to(device),
                       torch.stack(words).to(device))


def _grounding(encoder: DualEncoder, cfg, data: list[ImageCaptions], rows: list[_Row],
               device: str) -> Grounding | None:
    """The grounded tokens of a batch's captions: every token of each phrase, with its box's share of each region."""
    pairs, tokens, targets = [], [], []
    for i, text, phrase, share in _grounded_phrases(data, rows, cfg.regions):
        for k in phrase_tokens(encoder.tokenizer, text, phrase):
            if k < cfg.max_text_tokens - 1:  # the store keeps the first Tt-1 tokens, then the end token
                pairs.append(i)
                tokens.append(k)
                targets.append(share)
    if not pairs:
        return None
    return Grounding(torch.tensor(pairs, device=device), torch.tensor(tokens, device=device),
                     torch.stack(targets).to(device))


def _grounded_phrases(data: list[ImageCaptions], rows: list[_Row],
                      regions: int) -> Iterator[tuple[int, str, Phrase, torch.Tensor]]:
    """Each grounded phrase of a batch's captions: its batch row, its caption, the phrase, and its box's share
    of each region of a regions x regions grid (region_shares)."""
    for i, r in enumerate(rows):
        item = data[r.item]
        text = item.captions[r.caption]
        for phrase in item.phrases[r.caption] if item.phrases else ():
            yield i, text, phrase, region_shares(phrase.box, regions)


@functools.lru_cache(maxsize=1 << 18)  # every step asks again for the captions of earlier epochs
def phrase_tokens(tokenizer, text: str, phrase: Phrase) -> range:
    """Positions of a phrase's tokens in the text's token ids (start token at 0), for tokenizers that split
    words before BPE as CLIP's does, so that a prefix ending at a word boundary encodes as a prefix."""
    _check_bpe(tokenizer, "train with --grounding-weight 0 for this model")
    return range(1 + len(tokenizer.encode(text[:phrase.start])), 1 + len(tokenizer.encode(text[:phrase.end])))


@functools.lru_cache(maxsize=1 << 18)  # every step asks again for the captions of earlier epochs
def phrase_words(tokenizer, text: str, phrase: Phrase) -> tuple[int, ...]:
    """The token ids of a phrase's words (CLIP's BPE splits words before merging, so they are the ids its
    tokens have in the text)."""
    _check_bpe(tokenizer, "train without region_words for this model")
    return tuple(tokenizer.encode(text[phrase.start:phrase.end]))


def _check_bpe(tokenizer, advice: str) -> None:
    if not hasattr(tokenizer, "encode"):
        raise ItmError(f"grounded phrases need a tokenizer with encode() (CLIP's BPE); {advice}")


@functools.lru_cache(maxsize=1 << 16)  # callers copy it (torch.stack), never change it in place
def region_shares(box: tuple[float, float, float, float], regions: int) -> torch.Tensor:
    """(1 + regions**2,) the share of `box` (fractions of the image) in each region of the grid, row by row,
    after a zero for the CLS token: the attention a phrase naming that box should pay."""
    edges = torch.linspace(0, 1, regions + 1)
    x0, y0, x1, y1 = box
    wx = (torch.clamp(edges[1:], max=x1) - torch.clamp(edges[:-1], min=x0)).clamp_min(0)  # (R,)
    wy = (torch.clamp(edges[1:], max=y1) - torch.clamp(edges[:-1], min=y0)).clamp_min(0)
    area = (wy[:, None] * wx[None]).flatten()  # (R*R,)
    return torch.cat([torch.zeros(1), area / area.sum()])


def _hard_image_rows(data: list[ImageCaptions], rows: list[_Row]) -> torch.Tensor | None:
    """(B,) for each row's caption, the batch row of an image the data names as confusable with its own, or -1."""
    where = {data[r.item].image: i for i, r in enumerate(rows)}
    out = [next((where[p] for p in data[r.item].hard_images if p in where), -1) for r in rows]
    return torch.tensor(out) if any(i >= 0 for i in out) else None


def degrade(image: Image.Image, rng: random.Random) -> bytes:
    """A mildly degraded copy of an image, as JPEG bytes: half the time shrunk to 1/2..1 of its side
    (bicubic or bilinear), then re-encoded at a JPEG quality of 40..95, as photos are when shared."""
    if rng.random() < 0.5:
        scale = rng.uniform(0.5, 1.0)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, rng.choice((Image.Resampling.BICUBIC, Image.Resampling.BILINEAR)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=rng.randint(40, 95))
    return out.getvalue()


class _ImageCache:
    """Decoded, preprocessed training images, kept in memory as fp16 (small datasets fit); with
    `variants`, that many degraded copies of each image too, each made once, when first drawn."""

    def __init__(self, encoder: DualEncoder, workers: int, on_skip, max_items: int = 50_000, variants: int = 0):
        self.encoder, self.workers, self.on_skip, self.max_items = encoder, workers, on_skip, max_items
        self.variants = variants
        self.cache: dict[Path, torch.Tensor | None] = {}
        self.files: dict[Path, bytes] = {}
        self.degraded: dict[tuple[Path, int], torch.Tensor] = {}
        self.skipped: list[str] = []

    def _load(self, path: Path) -> torch.Tensor | None:
        try:
            raw = read_file(path)
            x = self.encoder.load_pixels(raw).half()
        except DecodeError as e:
            self.skipped.append(str(path))
            if self.on_skip:
                self.on_skip(str(path), str(e))
            return None
        if self.variants and len(self.files) < self.max_items:
            self.files[path] = raw
        return x

    def _degrade(self, key: tuple[Path, int]) -> torch.Tensor | None:
        path, variant = key
        try:
            raw = self.files.get(path) or read_file(path)
            # seeded by the file's bytes, not its path: the same copy whenever and wherever it is made,
            # so that resumed runs, and runs on the data at another place, repeat
            rng = random.Random(f"{content_hash(raw)}/{variant}")
            image = load_image(raw, min_side=self.encoder.image_size)
            return self.encoder.load_pixels(degrade(image, rng)).half()
        except DecodeError:  # gone or changed since it was first read: the clean image stands in
            return None

    def get(self, paths: list[Path], augment: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
        """(B', 3, S, S) the images that load, and their positions in `paths`; with `augment`, that share
        of them (drawn with `seed`) is one of the image's degraded copies instead."""
        missing = [p for p in dict.fromkeys(paths) if p not in self.cache]
        loaded = dict(zip(missing, ordered_map(self._load, missing, self.workers, prefetch=len(missing) or 1)))
        for p, x in loaded.items():
            if len(self.cache) < self.max_items or x is None:  # failures are remembered, never retried
                self.cache[p] = x
        tensors = [self.cache[p] if p in self.cache else loaded[p] for p in paths]
        keep = [i for i, x in enumerate(tensors) if x is not None]
        if augment and self.variants and keep:
            rng = random.Random(seed)
            chosen = {i: (paths[i], rng.randrange(self.variants)) for i in keep if rng.random() < augment}
            new = [k for k in dict.fromkeys(chosen.values()) if k not in self.degraded]
            made = dict(zip(new, ordered_map(self._degrade, new, self.workers, prefetch=len(new) or 1)))
            for key, x in made.items():
                if x is not None and len(self.degraded) < self.max_items:  # past the cap, made again when drawn
                    self.degraded[key] = x
            for i, key in chosen.items():
                x = self.degraded.get(key, made.get(key))
                tensors[i] = tensors[i] if x is None else x
        stacked = torch.stack([tensors[i] for i in keep]).float() if keep else torch.empty(0)
        return stacked, keep


def texts_of(data: list[ImageCaptions], negatives: bool = True) -> list[str]:
    """Every caption of the data, and with `negatives` every false caption, in order (repeats kept)."""
    return [t for d in data for t in (*d.captions, *(d.negatives or () if negatives else ())) if t]


class _FrozenFeatures:
    """What frozen encoders make of each training image and text, computed once before the first step
    (`fill`) and kept up to `budget_gb`, so that a reranker's stage runs the encoders over its data once
    instead of at every step; what does not fit is encoded when drawn, as without the cache.

    Filled in one pass, not as batches first draw each item: kept rows made between steps, hundreds of
    thousands of small tensors among each step's large temporaries, left a whole reranker stage's
    process growing to 10 GB and its steps slowing from 0.66 to about 0.9 s.

    Each row of an encoder's output depends on its own input only, and text padding is masked out
    downstream, so a kept row equals the one its batch would have given, up to rounding: matrix kernels
    sum in an order that can change with the batch's shape. A run with the cache therefore follows one
    without it closely, not bit for bit.
    """

    def __init__(self, encoder: DualEncoder, images: _ImageCache, cfg, budget_gb: float):
        self.encoder, self.images, self.cfg = encoder, images, cfg
        self.room = int(budget_gb * 2**30)  # bytes left
        self.image: dict[Path, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.text: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.grid: tuple[int, int] | None = None
        self.filling = False

    def fill(self, paths: list[Path], texts: list[str], chunk: int = 256) -> None:
        """Encode and keep these images and texts (until the budget is spent); later calls keep nothing."""
        self.filling = True
        try:
            for s in range(0, len(paths), chunk):
                self.encode_images(paths[s:s + chunk])
            texts = list(dict.fromkeys(texts))
            for s in range(0, len(texts), chunk):
                self.encode_texts(texts[s:s + chunk])
        finally:
            self.filling = False

    def _keep(self, table: dict, key, emb: torch.Tensor, tokens: list[torch.Tensor]) -> tuple:
        size = sum(t.numel() * t.element_size() for t in (emb, *tokens))
        if not self.filling or size > self.room:
            return emb, tokens
        table[key] = row = (emb.clone(), [t.clone() for t in tokens])  # own storage, not a view of the batch's
        self.room -= size
        return row

    def encode_images(self, paths: list[Path]) -> tuple[Encoded | None, list[int]]:
        """The images' features (Encoded as encode_images gives them), for those that load, and their positions."""
        rows = {p: self.image[p] for p in paths if p in self.image}
        missing = [p for p in dict.fromkeys(paths) if p not in rows]
        if missing:
            pixels, keep = self.images.get(missing)
            if keep:
                out = self.encoder.encode_images(pixels, self.cfg.image_layers)
                self.grid = out.grid
                for j, i in enumerate(keep):
                    rows[missing[i]] = self._keep(self.image, missing[i], out.embeddings[j], [t[j] for t in out.tokens])
        keep = [i for i, p in enumerate(paths) if p in rows]
        if not keep:
            return None, keep
        chosen = [rows[paths[i]] for i in keep]
        return Encoded(torch.stack([r[0] for r in chosen]), [torch.stack(level) for level in zip(*(r[1] for r in chosen))],
                       grid=self.grid), keep

    def encode_texts(self, texts: list[str]) -> Encoded:
        """The texts' features, as encode_texts gives them (padding rows zero, and masked)."""
        rows = {t: self.text[t] for t in texts if t in self.text}
        missing = [t for t in dict.fromkeys(texts) if t not in rows]
        if missing:
            out = self.encoder.encode_texts(missing, self.cfg.text_layers)
            for j, (t, n) in enumerate(zip(missing, out.mask.sum(1).tolist())):
                rows[t] = self._keep(self.text, t, out.embeddings[j], [x[j, :n] for x in out.tokens])
        chosen = [rows[t] for t in texts]
        lengths = torch.tensor([len(r[1][0]) for r in chosen])
        tokens = [torch.nn.utils.rnn.pad_sequence(level, batch_first=True) for level in zip(*(r[1] for r in chosen))]
        mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
        return Encoded(torch.stack([r[0] for r in chosen]), tokens, mask=mask)


def _set_lr(optimizer, groups, opts: TrainOptions, step: int, total: int) -> None:
    warm = min(1.0, (step + 1) / max(1, opts.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))
    for g, base in zip(optimizer.param_groups, [opts.lr, opts.encoder_lr]):
        g["lr"] = base * warm * decay


def _save_weights(folder: Path, encoder: DualEncoder, reranker: FusionReranker | None, opts: TrainOptions,
                  spec: ModelSpec) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if reranker is not None:
        save_reranker(reranker, folder / RERANKER_FILE)
    if opts.train_encoders:
        save_encoder(encoder.model, spec.arch, folder / ENCODER_FILE)


def _save(out_dir: Path, encoder: DualEncoder, reranker: FusionReranker | None, optimizer, loss_fn: ItmLoss,
          heads: RegionWordHeads | None, opts: TrainOptions, spec: ModelSpec, progress: dict) -> None:
    """The latest weights and everything a resumed run needs: optimizer, temperature, region-word heads,
    step, best so far."""
    _save_weights(out_dir, encoder, reranker, opts, spec)
    state = optimizer.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    tensors["logit_scale"] = loss_fn.logit_scale.detach()
    if heads is not None:
        tensors.update({f"words.{k}": v for k, v in heads.state_dict().items()})
    save_checkpoint(tensors, {"kind": STATE_KIND, **progress, "param_groups": state["param_groups"],
                              "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}},
                    out_dir / STATE_FILE)


def _load_state(out_dir: Path, optimizer, loss_fn: ItmLoss, heads: RegionWordHeads | None = None) -> dict:
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


class _Log:
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
