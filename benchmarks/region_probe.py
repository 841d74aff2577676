"""What the demo model's image tower knows about each cell: small probes on its region tokens.

    python benchmarks/region_probe.py                 # the bundled demo model, seed-0 test split
    python benchmarks/region_probe.py --seed 1 --train-images 700
    python benchmarks/region_probe.py --model itm-demo --checkpoint ENCODER --reranker data/demo/reranker.safetensors

The synthetic world puts at most one object in each cell of a 3 x 3 grid, and the demo image
tower has one patch per cell, so each region token should say what is in its cell. For every
layer of the image tower, a small probe (one hidden layer of 256) is fitted on the region tokens
of the first --train-images images of the test split and scored on the rest: the
cell's colour, shape and size (each with "empty" as a class), overall and on occupied cells by
the object's size. Nothing here trains the model; the split is the report's own
(quality_report.py generates it on first use).

Then, as a test of composition, the same probes are fitted again without the cells that hold a
colour-shape pair held out of training (itm.data.synth HELD_OUT), and scored on the occupied cells
of the scored images, those holding a seen pair and those holding a held-out one apart. If the
tokens hold colour and shape as separate attributes, a held-out pair's cell reads as well as a
seen pair's; if they hold them as one conjoint code, its shape or colour reads worse.

High figures on occupied cells say that the frozen tokens hold that attribute, so that a reranker
reading those layers can learn it; low ones, that the image tower loses it and must improve.
(A linear probe is not the measure here: the tokens hold shape and size nonlinearly.) Writes JSON
(benchmarks/results/region_probe.json).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from itm.data.synth.world import COLOURS, HELD_OUT, SHAPES, SIZES
from itm.training.data import load_dataset

import benchlib
from quality_report import ROOT, load_models, machine, split_meta, test_split

ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}


def held_out_cells(scenes: list, grid: int = 3) -> np.ndarray:
    """(N * grid * grid,) bool: the cell holds an object whose colour-shape pair is held out of training."""
    return np.array([(r, c) in {(o.row, o.col) for o in scene.objects if o.combo in HELD_OUT}
                     for scene in scenes for r in range(grid) for c in range(grid)])


def cell_labels(scenes: list, grid: int = 3) -> dict[str, np.ndarray]:
    """(N * grid * grid,) per attribute: 0 for an empty cell, else 1 + the index of the cell object's value."""
    out = {name: [] for name in ATTRIBUTES}
    for scene in scenes:
        cells = {(o.row, o.col): o for o in scene.objects}
        for r in range(grid):
            for c in range(grid):
                o = cells.get((r, c))
                for name, values in ATTRIBUTES.items():
                    out[name].append(values.index(getattr(o, name)) + 1 if o else 0)
    return {name: np.array(v) for name, v in out.items()}


def probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, hidden: int = 256,
          epochs: int = 400) -> torch.Tensor:
    """Predicted classes of x_test by a one-hidden-layer MLP fitted (full batch, AdamW) on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    net = torch.nn.Sequential(torch.nn.Linear(x_train.shape[1], hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, int(y_train.max()) + 1))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(net(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        return net(x_test).argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="world seed of the test split")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--checkpoint", type=Path, help="encoder weights (with --model itm-demo)")
    ap.add_argument("--reranker", type=Path, help="the reranker whose image layers are marked read (with --checkpoint)")
    ap.add_argument("--train-images", type=int, default=700, help="images whose cells fit the probes; the rest score")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "region_probe.json")
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    encoder, reranker = load_models(args.model, args.checkpoint, args.reranker)
    dataset = test_split(args.seed)
    data = load_dataset(dataset, split="test")
    scenes = split_meta(dataset, data)["scenes"]
    layers = list(range(-encoder.n_image_layers, 0))
    read = set(reranker.cfg.image_layers) if reranker else set()
    pixels = torch.stack([encoder.load_pixels(d.image) for d in data])
    out = encoder.encode_images(pixels, layers)
    h, w = out.grid
    if (h, w) != (3, 3):
        raise SystemExit(f"the image tower has a {h} x {w} grid; this probe reads one token per cell of a 3 x 3 world")
    labels = {k: torch.from_numpy(v) for k, v in cell_labels(scenes).items()}
    image = torch.arange(len(data)).repeat_interleave(9)
    train, test = image < args.train_images, image >= args.train_images
    size = labels["size"][test]
    results = {}
    print(f"{len(data)} images, probes fitted on the cells of {args.train_images}, scored on {len(data) - args.train_images}")
    print(f"{'layer':>5} {'read':>4} {'attribute':9} {'all cells':>9} {'occupied':>8} {'small':>6} {'large':>6}")
    cells = [t[:, 1:].reshape(-1, t.shape[-1]) for t in out.tokens]  # region tokens, row by row, after the CLS
    for layer, x in zip(layers, cells):
        results[layer] = {}
        for name, y in labels.items():
            ok = (probe(x[train], y[train], x[test]) == y[test]).float()
            row = {"all": 100 * float(ok.mean()), "occupied": 100 * float(ok[size > 0].mean()),
                   "small": 100 * float(ok[size == 1].mean()), "large": 100 * float(ok[size == 2].mean())}
            results[layer][name] = row
            print(f"{layer:5d} {'yes' if layer in read else 'no':>4} {name:9} {row['all']:9.1f} "
                  f"{row['occupied']:8.1f} {row['small']:6.1f} {row['large']:6.1f}")
    held = torch.from_numpy(held_out_cells(scenes))
    fit, seen, unseen = train & ~held, test & ~held & (labels["size"] > 0), test & held
    scored = seen | unseen
    seen_row = seen[scored]  # which of the scored cells hold a seen pair
    composition = {}
    print(f"probes fitted without held-out pairs' cells ({int((train & held).sum())} left out), scored on "
          f"occupied cells: {int(seen.sum())} holding a seen pair, {int(unseen.sum())} a held-out one")
    print(f"{'layer':>5} {'read':>4} {'attribute':9} {'seen':>6} {'held-out':>8}")
    for layer, x in zip(layers, cells):
        composition[layer] = {}
        for name, y in labels.items():
            if name == "size":  # a pair is colour and shape; size is not part of what is held out
                continue
            ok = (probe(x[fit], y[fit], x[scored]) == y[scored]).float()
            row = {"seen": 100 * float(ok[seen_row].mean()), "held_out": 100 * float(ok[~seen_row].mean())}
            composition[layer][name] = row
            print(f"{layer:5d} {'yes' if layer in read else 'no':>4} {name:9} {row['seen']:6.1f} {row['held_out']:8.1f}")
    report = {"dataset": str(dataset.relative_to(ROOT)), "model": args.model, "train_images": args.train_images,
              "layers": {str(k): v for k, v in results.items()},
              "composition": {"cells_seen": int(seen.sum()), "cells_held_out": int(unseen.sum()),
                              "layers": {str(k): v for k, v in composition.items()}},
              "read_by_reranker": sorted(read), "machine": machine(),
              "seconds": round(time.time() - t0, 1)}
    benchlib.write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
