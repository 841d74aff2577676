"""itm-calibrate: fit a reranker's probability of match, and store it beside the reranker.

    itm-calibrate --index IDX --judgements judged.jsonl    # on your own judgements of the index's images
    itm-calibrate --model demo                             # on a held-out split of the synthetic world
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from itm.common.cli import user_errors

PROG = "itm-calibrate"


def calibrate_command(
    judgements: Optional[Path] = typer.Option(None, "--judgements", help="JSONL of judged pairs, one a line: "
                                              '{"query": TEXT, "path": IMAGE, "relevant": true|false}; fits the '
                                              "reranker of --index on them."),
    index: Optional[Path] = typer.Option(None, "--index", envvar="ITM_INDEX", help="Index whose reranker "
                                         "--judgements calibrates (default: per-user index)."),
    model: str = typer.Option("demo", help="Without --judgements: the model whose reranker to calibrate on the "
                              "synthetic world, a bundle (demo) or an open_clip name."),
    pretrained: Optional[str] = typer.Option(None),
    checkpoint: Optional[Path] = typer.Option(None),
    reranker: Optional[str] = typer.Option(None, help="Fusion reranker: a checkpoint path, a URL, or "
                                           "hf-hub:ORG/NAME[@REVISION] (default: the bundle's)."),
    split: str = typer.Option("val", help="Synthetic-world split to fit on (held out from training: val)."),
    images: int = typer.Option(300, min=10, help="Held-out images indexed."),
    queries: int = typer.Option(600, min=10, help="Captions asked (true captions of the images, and false ones)."),
    seed: int = typer.Option(0, help="Seed of the split (the demo recipe's is 0)."),
    rerank_k: int = typer.Option(50, min=1, help="Candidates judged per query, as itm-search reranks them."),
    method: str = typer.Option("platt", help="platt (slope and offset) or temperature (slope alone)."),
) -> None:
    """Fit p = sigmoid(a * logit + b) to the reranker's judgements of labelled queries; save it beside the reranker."""
    with user_errors(PROG):
        from itm.common.paths import default_index_dir
        from itm.models.registry import resolve_model

        from .calibrate import calibrate_on_judgements, calibrate_on_world

        if judgements is not None:
            cal, path = calibrate_on_judgements(index or default_index_dir(), judgements, rerank_k=rerank_k,
                                                method=method)
        else:
            spec = resolve_model(model, None if checkpoint else pretrained, checkpoint, reranker)
            cal, path = calibrate_on_world(spec, split, images=images, queries=queries, seed=seed,
                                           rerank_k=rerank_k, method=method)
    f = cal.fitted_on
    typer.echo(f"{path}: p = sigmoid({cal.a:.4f} * logit + {cal.b:.4f}) from {f['pairs']} pairs "
               f"({f['positives']} matches); ECE {f['ece_sigmoid']:.4f} as a plain sigmoid, "
               f"{f['ece_calibrated']:.4f} calibrated")


def main() -> None:
    typer.run(calibrate_command)


if __name__ == "__main__":
    main()
