"""itm-eval: Recall@1/5/10 both ways and RSUM, recall-only and two-stage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from itm.common.cli import DEVICE_HELP, user_errors, warn
from itm.common.options import DEVICE

PROG = "itm-eval"


def eval_command(
    dataset: Path = typer.Argument(..., help="Karpathy-split JSON, or a .jsonl/.csv/.parquet of (image, caption)."),
    image_root: Optional[Path] = typer.Option(None, help="Folder image paths are relative to."),
    split: str = typer.Option("test"),
    model: str = typer.Option("ViT-B-32", help="Dual encoder: open_clip name or bundle (e.g. demo)."),
    pretrained: Optional[str] = typer.Option(None),
    checkpoint: Optional[Path] = typer.Option(None),
    reranker: Optional[str] = typer.Option(None, help="Fusion reranker: a checkpoint path, a URL, or "
                                           "hf-hub:ORG/NAME[@REVISION] (default: the bundle's)."),
    rerank_k: List[int] = typer.Option([10, 50], help="Two-stage depths to evaluate (repeatable)."),
    device: str = typer.Option(DEVICE, help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Evaluate retrieval on the DATASET split."""
    with user_errors(PROG):
        from itm.models.encoder import DualEncoder
        from itm.models.fusion_checkpoint import load_reranker
        from itm.models.registry import resolve_model

        from .data import load_dataset
        from .evaluate import embed_dataset, rank, recall

        spec = resolve_model(model, None if checkpoint else pretrained, checkpoint, reranker)
        data = load_dataset(dataset, image_root, split, on_skip=lambda p, why: warn(PROG, f"skipping {p}: {why}"))
        encoder = DualEncoder.load(spec, device)
        fusion = load_reranker(spec.reranker, device) if spec.reranker else None
        feats = embed_dataset(encoder, fusion, data)
        rows = {"recall": recall(rank(feats))}
        for k in (rerank_k if fusion is not None else []):
            rows[f"two-stage k={k}"] = recall(rank(feats, fusion, k))
    if as_json:
        typer.echo(json.dumps({"images": len(data), "captions": len(feats.texts), "results": rows}, indent=1))
        return
    typer.echo(f"{len(data)} images, {len(feats.texts)} captions ({split})")
    typer.echo(f"{'':18} {'t2i R@1':>8} {'R@5':>6} {'R@10':>6}  {'i2t R@1':>8} {'R@5':>6} {'R@10':>6}  {'RSUM':>6}")
    for name, r in rows.items():
        typer.echo(f"{name:18} {r['t2i_r1']:8.1f} {r['t2i_r5']:6.1f} {r['t2i_r10']:6.1f}  "
                   f"{r['i2t_r1']:8.1f} {r['i2t_r5']:6.1f} {r['i2t_r10']:6.1f}  {r['rsum']:6.1f}")


def main() -> None:
    typer.run(eval_command)
