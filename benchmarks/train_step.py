"""Seconds per training step of the demo recipe's reranker stage, fp32 against bf16 autocast.

    python data/demo/train_demo.py --stage data      # the synthetic dataset, once
    python benchmarks/train_step.py [--steps 40] [--repeats 2] [--out benchmarks/results/train_step.json]

Runs `retrieval.train.train` as the recipe's reranker stage does (its TrainOptions, no validation,
no checkpoints but the last) on the frozen bundled demo encoder and the first --images training
images, twice per precision: a warm-up of one epoch and a step (every image is decoded and
cached by then), then the warm-up and --steps more. The difference of the two runs' times, over
--steps, is the cost of a step with the set-up (building the model, decoding) taken out. Precisions alternate, --repeats times, and each figure is the median over repeats, so a
drift of the machine's speed touches both alike. bf16 is fast only on a CPU with native bf16
arithmetic (AVX-512 BF16, AMX); the script records whether this one has it.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.demo.train_demo import STAGE2  # noqa: E402
from indexer.encoder import cpu_has_native_bf16  # noqa: E402
from indexer.models import resolve_model  # noqa: E402
from retrieval.data import load_dataset  # noqa: E402
from retrieval.train import train  # noqa: E402

DATASET = ROOT / "data" / "demo" / "work" / "synth" / "dataset_karpathy.json"


def seconds(spec, data, steps: int, precision: str) -> float:
    opts = dataclasses.replace(STAGE2, max_steps=steps, stop_after=None, eval_every=0, patience=0,
                               save_every=10**9, progress=False, precision=precision)
    with tempfile.TemporaryDirectory() as out:
        return train(spec, data, out, opts).seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=DATASET)
    ap.add_argument("--encoder", type=Path, default=ROOT / "data" / "demo" / "encoder.safetensors")
    ap.add_argument("--images", type=int, default=640, help="training images used")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = ap.parse_args()
    if not args.dataset.is_file():
        sys.exit(f"{args.dataset} not found: run `python data/demo/train_demo.py --stage data` first")
    facts = benchlib.machine_facts()
    spec = resolve_model("itm-demo", checkpoint=args.encoder)
    data = load_dataset(args.dataset, split="train")[:args.images]
    warmup = -(-len(data) // STAGE2.batch_size) + 1  # past the first epoch, which decodes the images
    steps = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        for precision, seen in steps.items():
            short = seconds(spec, data, warmup, precision)
            seen.append((seconds(spec, data, warmup + args.steps, precision) - short) / args.steps)
            print(f"{precision}: {seen[-1]:.3f} s per step", flush=True)
    rows = {p: {"step_s": statistics.median(seen), "each_s": seen} for p, seen in steps.items()}
    ratio = rows["bf16"]["step_s"] / rows["fp32"]["step_s"]
    print(f"median s per step: fp32 {rows['fp32']['step_s']:.3f}, bf16 {rows['bf16']['step_s']:.3f}; "
          f"bf16 / fp32 {ratio:.2f} (native bf16: {cpu_has_native_bf16()})")
    facts = benchlib.finish(facts)
    print(benchlib.describe_machine(facts))
    benchlib.write_json(args.out, {"rows": rows, "bf16_over_fp32": ratio, "native_bf16": cpu_has_native_bf16(),
                                   "batch_size": STAGE2.batch_size, "steps": args.steps, "warmup": warmup,
                                   "images": len(data), "machine": facts, "finished_at": time.strftime("%F %T")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
