"""itm-train: train the fusion reranker (and optionally the dual encoders) on image-caption data."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from itm.common.cli import DEVICE_HELP, user_errors, warn
from itm.common.options import DEVICE

PROG = "itm-train"


def train_command(
    dataset: Path = typer.Argument(..., help="Karpathy-split JSON, or a .jsonl/.csv/.parquet of (image, caption)."),
    out: Path = typer.Option(..., "--out", help="Folder for checkpoints (reranker.safetensors, ...)."),
    image_root: Optional[Path] = typer.Option(None, help="Folder image paths are relative to (default: the file's)."),
    split: str = typer.Option("train", help="Split to train on, when the data has splits."),
    model: str = typer.Option("ViT-B-32", help="Dual encoder: open_clip name or bundle."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip pretrained tag, or 'random'."),
    checkpoint: Optional[Path] = typer.Option(None, help="Local encoder checkpoint."),
    fusion: str = typer.Option("fusion-base", help="Fusion config name (models/fusion_configs)."),
    init_reranker: Optional[Path] = typer.Option(
        None, help="Fine-tune these reranker weights (reranker.safetensors) instead of a new --fusion model."),
    epochs: int = typer.Option(1, min=1),
    max_steps: Optional[int] = typer.Option(None, min=1),
    batch_size: int = typer.Option(64, min=2),
    lr: float = typer.Option(3e-4, help="Reranker learning rate."),
    train_encoders: bool = typer.Option(False, help="Fine-tune the dual encoders too."),
    no_reranker: bool = typer.Option(False, help="Train the encoders alone (contrastive loss only)."),
    encoder_lr: float = typer.Option(1e-5),
    contrastive_weight: float = typer.Option(1.0),
    matching_weight: float = typer.Option(1.0),
    ranking_weight: float = typer.Option(1.0),
    margin: float = typer.Option(1.0, help="Ranking-loss margin (match-logit units)."),
    grounding_weight: float = typer.Option(1.0, help="Grounding-loss weight, for data with grounded phrases."),
    region_words: float = typer.Option(0.0, min=0.0, help="With --train-encoders, weight of the region-word loss: "
                                       "each grounded phrase's words read from its box's image tokens (0: off)."),
    num_negatives: int = typer.Option(2, min=1, help="Hard negatives mined per image and per text."),
    more_negatives: int = typer.Option(0, min=0, help="False captions drawn each step per caption from the data's "
                                       "\"more_negatives\", beside its \"negative\"."),
    neighbours: int = typer.Option(0, min=0, help="Batch each image with its N nearest images (frozen encoders), "
                                   "so that in-batch negatives are confusable."),
    hard_negatives: str = typer.Option("sample", help="sample or hardest."),
    augment: float = typer.Option(0.0, min=0.0, max=1.0, help="Share of training images shown as a degraded copy "
                                  "(shrunk and/or JPEG re-encoded), for search over photos that were."),
    precision: str = typer.Option("fp32", help="fp32, or bf16: the reranker's fusion layers under bf16 autocast, "
                                  "about a seventh less per step on CPUs with native bf16 (AVX-512 BF16, AMX)."),
    fused_optimizer: bool = typer.Option(False, help="AdamW's fused kernel: the update in about a fifth of the "
                                         "default loop's time on a CPU; the same update up to rounding, so a "
                                         "seeded run follows another trajectory."),
    seed: int = typer.Option(0),
    device: str = typer.Option(DEVICE, help=DEVICE_HELP),
    workers: int = typer.Option(2, min=0),
    feature_cache_gb: float = typer.Option(4.0, min=0.0, help="With frozen encoders, keep each image's and text's "
                                           "features in memory up to this size, so each is encoded once (0: off)."),
    save_every: int = typer.Option(200, min=1),
    resume: bool = typer.Option(False, help="Continue from the checkpoints in --out."),
) -> None:
    """Train on DATASET and write safetensors checkpoints to --out."""
    with user_errors(PROG):
        from itm.models.registry import resolve_model

        from .data import load_dataset
        from .options import TrainOptions
        from .train import train

        spec = resolve_model(model, pretrained, checkpoint)
        data = load_dataset(dataset, image_root, split, on_skip=lambda p, why: warn(PROG, f"skipping {p}: {why}"))
        opts = TrainOptions(fusion=fusion, init_reranker=init_reranker, epochs=epochs, max_steps=max_steps,
                            batch_size=batch_size, lr=lr, neighbours=neighbours, more_negatives=more_negatives,
                            augment=augment,
                            encoder_lr=encoder_lr, train_encoders=train_encoders or no_reranker,
                            train_reranker=not no_reranker, contrastive_weight=contrastive_weight,
                            matching_weight=matching_weight, ranking_weight=ranking_weight, margin=margin,
                            grounding_weight=grounding_weight, region_words=region_words,
                            num_negatives=num_negatives, hard_negatives=hard_negatives, seed=seed, device=device,
                            precision=precision, fused_optimizer=fused_optimizer, workers=workers,
                            feature_cache_gb=feature_cache_gb, save_every=save_every, progress=True)
        r = train(spec, data, out, opts, resume=resume, on_skip=lambda p, why: warn(PROG, f"skipping {p}: {why}"),
                  data_name=f"{dataset.name} ({split})")
    parts = ", ".join(f"{k} {v:.4f}" for k, v in r.losses.items())
    typer.echo(f"{r.steps} steps in {r.seconds:.0f}s on {len(data)} images; last losses: {parts}")
    for path in (r.reranker, r.encoder):
        if path:
            typer.echo(f"wrote {path}")


def main() -> None:
    typer.run(train_command)
