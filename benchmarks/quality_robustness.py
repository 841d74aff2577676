"""Is the demo model tuned to one split? Its goal figures on other seeds' test splits and on degraded images.

    python benchmarks/quality_robustness.py                 # seeds 0, 1, 2; seed 0 re-encoded and resized
    python benchmarks/quality_robustness.py --seeds 0 3 --rerank-k 50

For every world seed, the test split (1,000 images x 5 captions, made on first use by
quality_report.test_split); for the first seed also two mildly degraded copies of its images:
re-encoded as JPEG at quality 75, and shrunk to 3/4 of their side and re-encoded (JPEG quality 90).
Each is evaluated as benchmarks/quality_report.py does; the table shows the figures the demo
model's goals are stated in. Results: benchmarks/results/quality_robustness.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from quality_report import ROOT, WORK, evaluate_split, load_models, machine, test_split

DEGRADATIONS = {
    "jpeg75": (1.0, 75),  # (scale of the side, JPEG quality)
    "resized": (0.75, 90),
}


def degraded(dataset: Path, name: str, split: str | None = None) -> Path:
    """A copy of a dataset (of its `split` alone, if given) whose images went through degradation
    `name`, made on first use."""
    scale, quality = DEGRADATIONS[name]
    out = dataset.parent.with_name(f"{dataset.parent.name}-{split + '-' if split else ''}{name}")
    target = out / "dataset_karpathy.json"
    if target.exists():
        return target
    meta = json.loads(dataset.read_text())
    meta["images"] = [im for im in meta["images"] if split is None or im["split"] == split]
    for im in meta["images"]:
        with Image.open(dataset.parent / im["filepath"] / im["filename"]) as src:
            img = src.convert("RGB")
        if scale != 1.0:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        im["filename"] = Path(im["filename"]).with_suffix(".jpg").name
        if im.get("twin"):
            im["twin"] = Path(im["twin"]).with_suffix(".jpg").name
        (out / im["filepath"]).mkdir(parents=True, exist_ok=True)
        img.save(out / im["filepath"] / im["filename"], quality=quality)
    target.write_text(json.dumps(meta))
    return target


def goal_figures(r: dict, k: int) -> dict:
    """The figures the goals name, from one evaluate_split result."""
    recall, two = r["stages"]["recall only"]["all"], r["stages"][f"two-stage k={k}"]["all"]
    oracle = r["oracle"]["all"]
    return {
        "t2i_truth1_recall": recall["t2i_truth1"], "t2i_truth1": two["t2i_truth1"],
        "t2i_r1": two["t2i_r1"], "t2i_r1_of_oracle": 100 * two["t2i_r1"] / oracle["t2i_r1"],
        "i2t_truth1": two["i2t_truth1"],
        "swap_fusion": r["swap"]["fusion"]["all"], "swap_fusion_held_out": r["swap"]["fusion"]["held_out"],
        "swap_dual": r["swap"]["dual"]["all"],
        "twins_recall": r["twins"]["recall only"]["all"], "twins_two_stage": r["twins"][f"two-stage k={k}"]["all"],
        "r10_recall": recall["t2i_r10"], "r10_two_stage": two["t2i_r10"],
    }


COLUMNS = [("t2i_truth1_recall", "truth@1 rec"), ("t2i_truth1", "truth@1 2st"), ("t2i_r1", "R@1 2st"),
           ("t2i_r1_of_oracle", "% oracle"), ("i2t_truth1", "i2t truth@1"), ("swap_dual", "swap dual"),
           ("swap_fusion", "swap fused"), ("swap_fusion_held_out", "held-out"), ("twins_recall", "twins rec"),
           ("twins_two_stage", "twins 2st"), ("r10_recall", "R@10 rec"), ("r10_two_stage", "R@10 2st")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--reranker", type=Path)
    ap.add_argument("--rerank-k", type=int, default=50)
    ap.add_argument("--work", type=Path, default=WORK, help="where the generated splits are kept")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality_robustness.json")
    args = ap.parse_args()
    t0 = time.time()
    encoder, reranker = load_models(args.model, args.checkpoint, args.reranker)
    if reranker is None:
        raise SystemExit(f"model {args.model} has no reranker: the goals are about two-stage search")
    splits = [(f"seed {s}", test_split(s, args.work)) for s in args.seeds]
    first = splits[0][1]
    splits += [(f"seed {args.seeds[0]} {name}", degraded(first, name)) for name in DEGRADATIONS]
    rows = {}
    print(f"{'split':16} " + " ".join(f"{title:>12}" for _, title in COLUMNS), flush=True)
    for name, dataset in splits:
        rows[name] = goal_figures(evaluate_split(encoder, reranker, dataset, (args.rerank_k,)), args.rerank_k)
        print(f"{name:16} " + " ".join(f"{rows[name][key]:12.1f}" for key, _ in COLUMNS), flush=True)
    base = rows[splits[0][0]]
    spread = {key: max(abs(r[key] - base[key]) for r in rows.values()) for key, _ in COLUMNS}
    print(f"{'max |diff|':16} " + " ".join(f"{spread[key]:12.1f}" for key, _ in COLUMNS))
    report = {"model": args.model, "rerank_k": args.rerank_k, "rows": rows, "max_abs_diff_from_first": spread,
              "degradations": {k: {"scale": s, "jpeg_quality": q} for k, (s, q) in DEGRADATIONS.items()},
              "machine": machine(), "seconds": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
