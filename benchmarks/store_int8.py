"""What the int8 rerank store costs in quality and saves on disk, on the synthetic test split.

    python benchmarks/store_int8.py            # the bundled demo model; makes the test split if it is missing

The test split (1,000 images, 5 captions each, seed 0: the split benchmarks/quality_report.py
reads; --images N takes its first N) is embedded once; its rerank-store features are then scored as stored in fp16 and as
stored in int8 with a float16 scale per token (indexer/store.py: quantize_int8, read back by
dequantize_int8), through the same evaluation as quality_report.py. Both sides of every pair
are quantized here, which is pessimistic: a query's own features are never stored. Bytes per
item are the arrays' sizes (the .npy header, 128 bytes per segment file, left out).
Writes benchmarks/results/store_int8.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from itm.data.synth.prepare import prepare
from itm.indexer.store import dequantize_int8, quantize_int8

import benchlib
import quality_report

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = ROOT / "data" / "demo" / "work" / "synth-test" / "dataset_karpathy.json"


def int8_round_trip(store: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_int8(store.numpy())
    return torch.from_numpy(dequantize_int8(q, scale))


def bytes_per_item(store: torch.Tensor) -> dict[str, int]:
    one = store[:1].numpy()
    q, scale = quantize_int8(one)
    return {"fp16": int(one.astype(np.float16).nbytes), "int8": int(q.nbytes + scale.nbytes)}


def first_images(dataset: Path, n: int) -> Path:
    """The split's first n images, as a dataset file of their own beside it (twins outside it are dropped)."""
    d = json.loads(dataset.read_text())
    images = [im for im in d["images"] if im["split"] == "test"][:n]
    kept = {im["filename"] for im in images}
    images = [{**im, "twin": im["twin"] if im.get("twin") in kept else None} for im in images]
    out = dataset.with_name(f"{dataset.stem}-first{n}.json")
    out.write_text(json.dumps({**d, "images": images}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--rerank-k", type=int, nargs="+", default=[50])
    ap.add_argument("--images", type=int, default=1000, help="the first N images of the split (and their captions)")
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = ap.parse_args()
    facts = benchlib.machine_facts()
    if not args.dataset.exists():
        print(prepare(args.dataset.parent, {"test": 1000}, 0, image_size=64, captions_per_image=5, workers=1))
    if args.images < 1000:
        args.dataset = first_images(args.dataset, args.images)
    t0 = time.time()
    encoder, reranker = quality_report.load_models(args.model, None, None)
    features = quality_report.embed_dataset(encoder, reranker, quality_report.load_dataset(args.dataset, split="test"))
    stores = {"fp16": features,
              "int8": dataclasses.replace(features, image_store=int8_round_trip(features.image_store),
                                          text_store=int8_round_trip(features.text_store))}
    results = {}
    for dtype, feats in stores.items():  # the split's evaluation, fed these features instead of embedding again
        quality_report.embed_dataset = lambda *a, feats=feats, **kw: feats
        results[dtype] = quality_report.evaluate_split(encoder, reranker, args.dataset, args.rerank_k)
    rows = []
    for dtype, r in results.items():
        for stage, subsets in r["stages"].items():
            a = subsets["all"]
            rows.append({"store": dtype, "stage": stage, **a})
        rows.append({"store": dtype, "stage": "swap accuracy (fusion)", "t2i_r1": r["swap"]["fusion"]["all"]})
    sizes = {"image": bytes_per_item(features.image_store), "text": bytes_per_item(features.text_store)}
    print(benchlib.format_table(rows, [("store", "store", "s"), ("stage", "stage", "s"), ("t2i_r1", "t2i R@1", ".2f"),
                                       ("t2i_r5", "R@5", ".2f"), ("t2i_r10", "R@10", ".2f"),
                                       ("i2t_r1", "i2t R@1", ".2f"), ("i2t_r5", "R@5", ".2f"),
                                       ("i2t_r10", "R@10", ".2f"), ("rsum", "RSUM", ".2f")]))
    for kind, b in sizes.items():
        print(f"{kind}: {b['fp16']} bytes fp16, {b['int8']} bytes int8 ({b['int8'] / b['fp16']:.3f})")
    benchlib.write_json(args.out, {"dataset": str(args.dataset.relative_to(ROOT) if args.dataset.is_relative_to(ROOT)
                                                  else args.dataset),
                                   "model": args.model, "results": results, "bytes_per_item": sizes,
                                   "seconds": round(time.time() - t0, 1), "machine": benchlib.finish(facts)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
