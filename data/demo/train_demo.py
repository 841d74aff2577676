"""Recipe for the bundled demo model: dual encoders, then the fusion reranker, on the synthetic world.

    python data/demo/train_demo.py     # about 50 min on a shared 2-core CPU; writes data/demo/*.safetensors

Stage 1 trains the `itm-demo` dual encoders from random weights with the contrastive loss.
Stage 2 freezes them and trains the `fusion-demo` reranker with matching + ranking losses
(contrastive still reported). The result is written as a bundle that `--model demo` loads.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.synth.prepare import prepare
from indexer.models import resolve_model
from retrieval.data import load_dataset
from retrieval.train import ENCODER_FILE, RERANKER_FILE, TrainOptions, train

HERE = Path(__file__).resolve().parent
SPLITS = {"train": 10_000, "val": 500, "test": 1_000}
SEED = 0
STAGE1 = TrainOptions(train_encoders=True, train_reranker=False, batch_size=128, encoder_lr=1e-3, lr=1e-3,
                      weight_decay=0.1, warmup_steps=100, max_steps=800, stop_after=300, epochs=100, seed=SEED,
                      save_every=100, progress=True)
STAGE2 = TrainOptions(fusion="fusion-demo", batch_size=64, lr=1e-3, warmup_steps=30, max_steps=600, stop_after=450,
                      epochs=100, num_negatives=2, hard_negatives="sample", seed=SEED, save_every=50, progress=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=HERE / "work", help="dataset and intermediate checkpoints")
    ap.add_argument("--out", type=Path, default=HERE, help="where the bundle goes")
    ap.add_argument("--stage", choices=["all", "data", "encoders", "reranker", "bundle"], default="all")
    ap.add_argument("--resume", action="store_true", help="continue a stage from its last checkpoint")
    args = ap.parse_args()
    t0 = time.time()
    dataset = args.work / "synth"
    if args.stage in ("all", "data"):
        print(prepare(dataset, SPLITS, SEED, image_size=64, captions_per_image=5, workers=2))
    data = load_dataset(dataset / "dataset_karpathy.json", split="train")
    if args.stage in ("all", "encoders"):
        r = train(resolve_model("itm-demo", "random"), data, args.work / "encoders", STAGE1, resume=args.resume)
        print(f"encoders: {r.steps} steps in {r.seconds / 60:.1f} min, losses {r.losses}")
    encoder = args.work / "encoders" / ENCODER_FILE
    if args.stage in ("all", "reranker"):
        r = train(resolve_model("itm-demo", checkpoint=encoder), data, args.work / "reranker", STAGE2,
                  resume=args.resume)
        print(f"reranker: {r.steps} steps in {r.seconds / 60:.1f} min, losses {r.losses}")
    if args.stage in ("all", "bundle"):
        write_bundle(encoder, args.work / "reranker" / RERANKER_FILE, args.out)
    print(f"done in {(time.time() - t0) / 60:.1f} min")


def write_bundle(encoder: Path, reranker: Path, out: Path) -> None:
    """Encoder weights stored as fp16 (loading casts them back to fp32), the reranker as trained."""
    out.mkdir(parents=True, exist_ok=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(encoder)).items()}
    save_file(half, str(out / "encoder.safetensors"))
    shutil.copyfile(encoder.with_suffix(".json"), out / "encoder.json")
    shutil.copyfile(reranker, out / "reranker.safetensors")
    shutil.copyfile(reranker.with_suffix(".json"), out / "reranker.json")
    bundle = {"arch": "itm-demo", "encoder": "encoder.safetensors", "reranker": "reranker.safetensors",
              "trained_by": "data/demo/train_demo.py"}
    (out / "bundle.json").write_text(json.dumps(bundle, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
