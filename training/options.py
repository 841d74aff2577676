"""What a training run is asked to do: TrainOptions, and the checks of its precision and layers."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from itm.common.errors import ItmError, ItmWarning
from itm.models.encoder import DualEncoder, bf16_is_emulated
from itm.models.fusion import FusionReranker, get_fusion_config


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


def reader_config(encoder: DualEncoder, reranker: FusionReranker | None, opts: TrainOptions):
    """The fusion config whose layers the encoder-stage losses shape: the reranker's trained beside the
    encoders, else opts.fusion's."""
    return reranker.cfg if reranker is not None else get_fusion_config(
        opts.fusion, image_width=encoder.image_width, text_width=encoder.text_width)
