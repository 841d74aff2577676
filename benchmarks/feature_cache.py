"""Memory and fill time of reranker training's feature cache, on the demo recipe's training data.

    python training/recipes/demo.py --stage data      # the synthetic dataset, once
    python benchmarks/feature_cache.py [--images 10000] [--out benchmarks/results/feature_cache.json]

Fills the cache that `itm.training.train.train` keeps for frozen encoders with every image, caption
and false caption of the first --images training images, as the trainer does before its first
step, with the bundled demo encoder and the `fusion-demo` reranker's layers (the images decoded
beforehand: the trainer decodes them with or without the cache). Prints what the cache holds in tensor bytes (what
`--feature-cache-gb` counts), how much the process's resident memory grew meanwhile (the tensors
plus the objects that hold them, and what the allocator keeps), and the seconds it took: the
encoder work a reranker stage does once with the cache, and at every step without it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import benchlib

ROOT = Path(__file__).resolve().parents[1]

from itm.models.encoder import DualEncoder
from itm.models.fusion import get_fusion_config
from itm.models.registry import resolve_model
from itm.training.batches import texts_of
from itm.training.caches import FrozenFeatures, ImageCache
from itm.training.data import load_dataset

DATASET = ROOT / "data" / "demo" / "work" / "synth" / "dataset_karpathy.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=DATASET)
    ap.add_argument("--encoder", type=Path, default=ROOT / "data" / "demo" / "encoder.safetensors")
    ap.add_argument("--images", type=int, default=10_000, help="training images used")
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = ap.parse_args()
    if not args.dataset.is_file():
        sys.exit(f"{args.dataset} not found: run `python training/recipes/demo.py --stage data` first")
    facts = benchlib.machine_facts()
    encoder = DualEncoder.load(resolve_model("itm-demo", checkpoint=args.encoder))
    cfg = get_fusion_config("fusion-demo", image_width=encoder.image_width, text_width=encoder.text_width)
    data = load_dataset(args.dataset, split="train")[:args.images]
    paths = [d.image for d in data]
    images = ImageCache(encoder, 2, None)
    for s in range(0, len(paths), 256):
        images.get(paths[s:s + 256])
    cache = FrozenFeatures(encoder, images, cfg, budget_gb=1024.0)
    budget, before, t0 = cache.room, benchlib.rss_bytes(), time.perf_counter()
    if before < 0:
        sys.exit("resident memory is read from /proc/self/status, which this system does not have")
    cache.fill(paths, texts_of(data))
    seconds, grown, held = time.perf_counter() - t0, benchlib.rss_bytes() - before, budget - cache.room
    print(f"{len(cache.image)} images and {len(cache.text)} texts: {held / 2**30:.2f} GiB of tensors, "
          f"resident memory +{grown / 2**30:.2f} GiB, filled in {seconds:.1f} s")
    facts = benchlib.finish(facts)
    print(benchlib.describe_machine(facts))
    benchlib.write_json(args.out, {"images": len(cache.image), "texts": len(cache.text), "tensor_bytes": held,
                                   "resident_growth_bytes": grown, "fill_s": seconds, "machine": facts,
                                   "finished_at": time.strftime("%F %T")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
