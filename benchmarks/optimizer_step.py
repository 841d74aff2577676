"""Milliseconds of one AdamW update over the demo recipe's trained parameters: torch's default
on a CPU (a Python loop over the tensors) against the fused kernel that itm.training.train.adamw picks.

    python benchmarks/optimizer_step.py [--steps 50] [--repeats 3] [--out benchmarks/results/optimizer_step.json]

Two parameter sets: the `itm-demo` dual encoders (what the recipe's encoder stage updates, 4,500
steps) and the bundled `fusion-demo` reranker (the reranker and hard stages, 5,500 steps). Each
update gets fixed random gradients; after a few warm-up updates, --steps updates are timed.
Variants alternate, --repeats times, and each figure is the median, so a drift of the machine's
speed touches both alike. The minutes a stage would save are the per-step difference times the
stage's steps: an estimate, not a timed stage.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import benchlib

ROOT = Path(__file__).resolve().parents[1]

from itm.models.encoder import DualEncoder
from itm.models.fusion_checkpoint import load_reranker
from itm.models.registry import resolve_model
from itm.training.train import adamw

STAGE_STEPS = {"encoders": 4500, "reranker": 5500}  # the recipe's encoder stage; its reranker and hard stages


def parameter_sets() -> dict[str, list[torch.Tensor]]:
    encoder = DualEncoder.load(resolve_model("itm-demo", "random"))
    reranker = load_reranker(resolve_model("demo").reranker)
    return {"encoders": list(encoder.model.parameters()), "reranker": list(reranker.parameters())}


def ms_per_update(params: list[torch.Tensor], fused: bool, steps: int) -> tuple[float, bool]:
    """Milliseconds per update, and whether the optimizer built is the fused one."""
    gen = torch.Generator().manual_seed(0)
    copies = [p.detach().clone().requires_grad_() for p in params]
    for c in copies:
        c.grad = torch.randn(c.shape, generator=gen) * 1e-3
    opt = adamw(copies, lr=1e-3, weight_decay=0.1) if fused else torch.optim.AdamW(copies, lr=1e-3, weight_decay=0.1)
    for _ in range(5):
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps * 1000, bool(opt.defaults.get("fused"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = ap.parse_args()
    facts = benchlib.machine_facts()
    sets = parameter_sets()
    runs: dict[tuple[str, bool], list[float]] = {}
    fused_built = {}
    for _ in range(args.repeats):
        for name, params in sets.items():
            for fused in (False, True):
                ms, built = ms_per_update(params, fused, args.steps)
                runs.setdefault((name, fused), []).append(ms)
                if fused:
                    fused_built[name] = built
    rows = []
    for name, params in sets.items():
        loop, fused = (statistics.median(runs[name, f]) for f in (False, True))
        rows.append({"parameters": name, "tensors": len(params), "values": sum(p.numel() for p in params),
                     "loop_ms": loop, "fused_ms": fused, "fused_built": fused_built[name],
                     "stage_steps": STAGE_STEPS[name], "saved_min": (loop - fused) * STAGE_STEPS[name] / 60000,
                     "loop_runs_ms": runs[name, False], "fused_runs_ms": runs[name, True]})
    print(benchlib.format_table(rows, [("parameters", "parameters", "s"), ("tensors", "tensors", "d"),
                                       ("values", "values", ",d"), ("loop_ms", "loop ms", ".2f"),
                                       ("fused_ms", "fused ms", ".2f"), ("stage_steps", "steps", ",d"),
                                       ("saved_min", "saved min (est.)", ".2f")]))
    facts = benchlib.finish(facts)
    print(benchlib.describe_machine(facts))
    benchlib.write_json(args.out, {"steps": args.steps, "repeats": args.repeats, "rows": rows, "machine": facts,
                                   "finished_at": time.strftime("%F %T")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
