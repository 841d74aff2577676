"""Seconds per training step of the demo recipe's reranker stage: fp32 against bf16 autocast, and
with against without the frozen encoders' feature cache; or of its encoder stage, without against
with the token margin (relation flips kept apart in the text tokens).

    python training/recipes/demo.py --stage data      # the synthetic dataset, once
    python benchmarks/train_step.py [--steps 40] [--repeats 2] [--out benchmarks/results/train_step.json]
    python benchmarks/train_step.py --variants bf16,bf16-nocache --out benchmarks/results/train_step_feature_cache.json
    python benchmarks/train_step.py --variants encoders,encoders-token-margin \
        --out benchmarks/results/train_step_token_margin.json
    python benchmarks/train_step.py --variants fp32-indexed,fp32 --out benchmarks/results/train_step_pairs.json
    python benchmarks/train_step.py --variants fp32,fp32-more2 --out benchmarks/results/train_step_more_negatives.json

Runs `itm.training.train.train` as the recipe's stage does (its TrainOptions, no validation, no
checkpoints but the last) from the bundled demo encoder (frozen in the reranker stage) on the first
--images training images (the encoder stage's without relational negatives, as the recipe gives it),
twice per variant: a warm-up of an epoch and a step (every image is decoded and cached by
then), then the warm-up and --steps more. The difference of the two runs' times, over --steps, is
the cost of a step with the set-up (building the model, decoding, filling the feature cache) taken
out. Variants alternate, --repeats times, and each figure is the median over repeats, so a drift
of the machine's speed touches both alike. bf16 is fast only on a CPU with native bf16 arithmetic
(AVX-512 BF16, AMX); the script records whether this one has it. "fp32-indexed" scores the
batch's pairs as the loss did before FusionReranker.forward took them by index (`pairs`): the
features indexed into one row per pair first, so that each side's own layers run once per pair.
"fp32-more2" draws two more false captions per caption each step (TrainOptions.more_negatives): the
dataset must carry them (`--stage data` writes them since they exist).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import benchlib

ROOT = Path(__file__).resolve().parents[1]

from itm.models.encoder import cpu_has_native_bf16
from itm.models.fusion import FusionReranker
from itm.models.registry import resolve_model
from itm.training.data import load_dataset
from itm.training.recipes.demo import STAGE1, STAGE2, attribute_negatives
from itm.training.train import train

DATASET = ROOT / "data" / "demo" / "work" / "synth" / "dataset_karpathy.json"


VARIANTS = {"fp32": (STAGE2, {"precision": "fp32"}), "bf16": (STAGE2, {"precision": "bf16"}),
            "bf16-nocache": (STAGE2, {"precision": "bf16", "feature_cache_gb": 0.0}),
            "fp32-indexed": (STAGE2, {"precision": "fp32"}),
            "fp32-more2": (STAGE2, {"precision": "fp32", "more_negatives": 2}),
            "encoders": (STAGE1, {}), "encoders-token-margin": (STAGE1, {"token_margin": 0.2})}


def forward_indexed(model, image_feats, text_feats, text_mask, attention=False, pairs=None):
    """FusionReranker.forward on features indexed into one row per pair, whatever computes once per item."""
    if pairs is not None:
        image_feats, text_feats, text_mask = image_feats[pairs[0]], text_feats[pairs[1]], text_mask[pairs[1]]
    return PAIRED_FORWARD(model, image_feats, text_feats, text_mask, attention=attention)


PAIRED_FORWARD = FusionReranker.forward


def seconds(spec, data, steps: int, variant: str) -> float:
    stage, changes = VARIANTS[variant]
    opts = dataclasses.replace(stage, max_steps=steps, stop_after=None, eval_every=0, patience=0,
                               save_every=10**9, progress=False, **changes)
    indexed = mock.patch.object(FusionReranker, "forward", forward_indexed) if variant.endswith("-indexed") \
        else nullcontext()
    with tempfile.TemporaryDirectory() as out, indexed:
        return train(spec, data, out, opts).seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=DATASET)
    ap.add_argument("--encoder", type=Path, default=ROOT / "data" / "demo" / "encoder.safetensors")
    ap.add_argument("--images", type=int, default=640, help="training images used")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="fp32,bf16", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = ap.parse_args()
    if not args.dataset.is_file():
        sys.exit(f"{args.dataset} not found: run `python training/recipes/demo.py --stage data` first")
    facts = benchlib.machine_facts()
    spec = resolve_model("itm-demo", checkpoint=args.encoder)
    data = load_dataset(args.dataset, split="train")[:args.images]
    names = args.variants.split(",")
    if len(names) != 2 or not set(names) <= set(VARIANTS) or VARIANTS[names[0]][0] is not VARIANTS[names[1]][0]:
        sys.exit(f"--variants: two of {', '.join(VARIANTS)} of the same stage, comma-separated")
    stage = VARIANTS[names[0]][0]
    if stage.train_encoders:
        data = attribute_negatives(data, args.dataset)
    warmup = -(-len(data) // stage.batch_size) + 1  # past the first epoch, which decodes the images
    steps = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, seen in steps.items():
            short = seconds(spec, data, warmup, name)
            seen.append((seconds(spec, data, warmup + args.steps, name) - short) / args.steps)
            print(f"{name}: {seen[-1]:.3f} s per step", flush=True)
    rows = {name: {"step_s": statistics.median(seen), "each_s": seen} for name, seen in steps.items()}
    (a, b), ratio_key = names, f"{names[1]}_over_{names[0]}"
    ratio = rows[b]["step_s"] / rows[a]["step_s"]
    print(f"median s per step: {a} {rows[a]['step_s']:.3f}, {b} {rows[b]['step_s']:.3f}; "
          f"{b} / {a} {ratio:.2f} (native bf16: {cpu_has_native_bf16()})")
    facts = benchlib.finish(facts)
    print(benchlib.describe_machine(facts))
    benchlib.write_json(args.out, {"rows": rows, ratio_key: ratio, "native_bf16": cpu_has_native_bf16(),
                                   "batch_size": stage.batch_size, "steps": args.steps, "warmup": warmup,
                                   "images": len(data), "machine": facts, "finished_at": time.strftime("%F %T")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
