"""Dual encoders alone on the recipe's val split, clean and degraded: does an encoder survive re-encoding?

    python benchmarks/encoder_robustness.py data/demo/encoder.safetensors data/demo/work/encoders/best/encoder.safetensors

For each `itm-demo` encoder checkpoint, recall-only text->image truth@1 and R@1 and image->text
truth@1 (as benchmarks/quality_report.py computes them) on the val split that
`training/recipes/demo.py --stage data` writes, and on copies of it degraded as
benchmarks/quality_robustness.py degrades the test split (JPEG 75; 3/4 side + JPEG 90). The val
split is what the recipe chooses by, so this compares encoder stages without reading the test
split. Results: benchmarks/results/encoder_robustness.json.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from quality_robustness import DEGRADATIONS, degraded

from itm.models.encoder import DualEncoder
from itm.models.registry import resolve_model

from quality_report import ROOT, WORK, evaluate_split, machine

FIGURES = (("t2i_truth1", "truth@1"), ("t2i_r1", "R@1"), ("i2t_truth1", "i2t truth@1"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", type=Path, nargs="+", help="itm-demo encoder checkpoints (encoder.safetensors)")
    ap.add_argument("--dataset", type=Path, default=WORK / "synth" / "dataset_karpathy.json",
                    help="the recipe's dataset (train_demo.py --stage data)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "encoder_robustness.json")
    args = ap.parse_args()
    if not args.dataset.is_file():
        raise SystemExit(f"{args.dataset} not found: run python training/recipes/demo.py --stage data first")
    t0 = time.time()
    splits = {"clean": args.dataset, **{name: degraded(args.dataset, name, "val") for name in DEGRADATIONS}}
    rows = {}
    print(f"{'encoder':60} {'split':8} " + " ".join(f"{title:>12}" for _, title in FIGURES), flush=True)
    for ck in args.checkpoints:
        encoder = DualEncoder.load(resolve_model("itm-demo", checkpoint=ck))
        rows[str(ck)] = {}
        for name, dataset in splits.items():
            with warnings.catch_warnings():  # val holds no held-out pairs: their subset's means are empty
                warnings.simplefilter("ignore", RuntimeWarning)
                r = evaluate_split(encoder, None, dataset, (), split="val")["stages"]["recall only"]["all"]
            rows[str(ck)][name] = {key: r[key] for key, _ in FIGURES}
            print(f"{str(ck)[-60:]:60} {name:8} " + " ".join(f"{r[key]:12.1f}" for key, _ in FIGURES), flush=True)
    report = {"rows": rows, "split": "val", "machine": machine(), "seconds": round(time.time() - t0, 1),
              "degradations": {k: {"scale": s, "jpeg_quality": q} for k, (s, q) in DEGRADATIONS.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
