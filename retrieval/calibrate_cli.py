"""itm-calibrate: fit a reranker's probability of match on held-out synthetic data, and store it beside the reranker.

    itm-calibrate --model demo        # writes data/demo/reranker.calibration.json (python -m retrieval.calibrate_cli)
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer

from indexer.cliutil import user_errors

PROG = "itm-calibrate"


def calibrate_command(
    model: str = typer.Option("demo", help="Model whose reranker to calibrate: a bundle (demo) or an open_clip name."),
    pretrained: Optional[str] = typer.Option(None),
    checkpoint: Optional[Path] = typer.Option(None),
    reranker: Optional[Path] = typer.Option(None, help="Fusion reranker checkpoint (default: the bundle's)."),
    split: str = typer.Option("val", help="Synthetic-world split to fit on (held out from training: val)."),
    images: int = typer.Option(300, min=10, help="Held-out images indexed."),
    queries: int = typer.Option(600, min=10, help="Captions asked (true captions of the images, and false ones)."),
    seed: int = typer.Option(0, help="Seed of the split (the demo recipe's is 0)."),
    rerank_k: int = typer.Option(50, min=1, help="Candidates judged per query, as itm-search reranks them."),
    method: str = typer.Option("platt", help="platt (slope and offset) or temperature (slope alone)."),
) -> None:
    """Fit p = sigmoid(a * logit + b) to the reranker's judgements of held-out queries; save it beside the reranker."""
    with user_errors(PROG):
        from indexer.models import resolve_model

        from . import calibration
        from .calibrate import candidate_pairs
        from .search import Searcher
        from data.synth.heldout import HeldOut

        spec = resolve_model(model, None if checkpoint else pretrained, checkpoint, reranker)
        if spec.reranker is None:
            raise typer.BadParameter(f"model {model} has no reranker; pass --reranker PATH")
        with tempfile.TemporaryDirectory(prefix="itm-calibrate-") as tmp:
            world = HeldOut.build(split, images, seed, spec, Path(tmp))
            asked = query_mix(world, queries)
            searcher = Searcher(world.index_dir, model=spec)
            logits, labels = candidate_pairs(searcher, asked, world.is_true, rerank_k)
        fitted_on = {"data": f"synthetic world, {split} split, seed {seed}, {images} images, {len(asked)} queries",
                     "rerank_k": rerank_k, "model": model}
        cal = calibration.fit(logits, labels, searcher.reranker_sha256, method, fitted_on)
        path = calibration.save(cal, spec.reranker)
    f = cal.fitted_on
    typer.echo(f"{path}: p = sigmoid({cal.a:.4f} * logit + {cal.b:.4f}) from {f['pairs']} pairs "
               f"({f['positives']} matches); ECE {f['ece_sigmoid']:.4f} as a plain sigmoid, "
               f"{f['ece_calibrated']:.4f} calibrated")


def query_mix(world, n: int) -> list[str]:
    """Half true captions of the indexed images, half their hard negatives (false of their own image), in a
    fixed order: the mix of questions whose answer is yes somewhere and those whose answer may be no."""
    true = [c for s in world.samples for c in s.captions]
    false = [c for s in world.samples for c in s.hard_negatives]
    step_t, step_f = max(1, len(true) // (n // 2)), max(1, len(false) // (n - n // 2))
    return true[::step_t][:n // 2] + false[::step_f][:n - n // 2]


def main() -> None:
    typer.run(calibrate_command)


if __name__ == "__main__":
    main()
