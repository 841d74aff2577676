"""Where `--dedup`'s default threshold sits: the embedding cosine of near-duplicates against that of distinct images.

    python benchmarks/dedup_threshold.py [--model demo] [--images 200] [--out benchmarks/results/dedup_threshold.json]

For held-out images of the synthetic world (test split), each image is embedded as rendered and
as three near-duplicates a photo library holds: re-saved as JPEG at quality 60, scaled to half
size and back, and cropped by 6% of each side and scaled back. Prints the cosine distribution
(min, 1st and 50th percentile) of each kind of near-duplicate with its original, of the
confusable twins (the same objects with two colours or positions exchanged: different images
that must not be collapsed), and of distinct images (each with the next one), and for
thresholds around the default, the share of near-duplicates caught and of twins and distinct
pairs wrongly collapsed.
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from itm.data.synth import generate_split
from itm.models.item_encoder import load_item_encoder
from itm.models.registry import resolve_model
from itm.retrieval.query import DEFAULT_DEDUP

import benchlib

THRESHOLDS = sorted({0.9, 0.93, 0.95, 0.97, 0.98, 0.99, DEFAULT_DEDUP})


def variants(im: Image.Image) -> dict[str, Image.Image]:
    w, h = im.size
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=60)
    dx, dy = round(0.06 * w), round(0.06 * h)
    return {"jpeg_q60": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
            "half_size": im.resize((w // 2, h // 2), Image.BILINEAR).resize((w, h), Image.BILINEAR),
            "crop_6pct": im.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.BILINEAR)}


def embed(encoder, images: list[Image.Image]) -> np.ndarray:
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(encoder.encode_images(encoder.load_pixels(buf.getvalue())[None]).emb[0])
    return np.stack(out)


def stats(x: np.ndarray) -> dict[str, float]:
    return {"n": int(len(x)), "min": float(x.min()), "p1": float(np.percentile(x, 1)), "p50": float(np.median(x)),
            "p99": float(np.percentile(x, 99)), "max": float(x.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = ap.parse_args()
    facts = benchlib.machine_facts()
    t0 = time.perf_counter()
    encoder = load_item_encoder(resolve_model(args.model))
    samples = generate_split("test", args.images, 0)
    originals = [s.render() for s in samples]
    base = embed(encoder, originals)
    cos = {}
    for kind in ("jpeg_q60", "half_size", "crop_6pct"):
        cos[kind] = np.sum(base * embed(encoder, [variants(im)[kind] for im in originals]), 1)
    where = {s.image_id: i for i, s in enumerate(samples)}
    twins = [(where[s.twin_id], i) for i, s in enumerate(samples) if s.twin_id in where]
    cos["twin"] = np.array([base[i] @ base[j] for i, j in twins])
    cos["distinct"] = np.sum(base * np.roll(base, 1, 0), 1)
    rows = {t: {kind: float(np.mean(c >= t)) for kind, c in cos.items()} for t in THRESHOLDS}
    result = {"model": args.model, "images": args.images, "default": DEFAULT_DEDUP,
              "cosine": {k: stats(c) for k, c in cos.items()}, "share_at_or_above": rows,
              "seconds": time.perf_counter() - t0, "machine": benchlib.finish(facts)}
    benchlib.write_json(args.out, result)
    print(benchlib.describe_machine(result["machine"]))
    print(f"model {args.model}, {args.images} test images of the synthetic world, {len(twins)} twin pairs\n")
    print(f"{'pair':10} {'n':>5} {'min':>7} {'p1':>7} {'median':>7} {'p99':>7}")
    for k, s in result["cosine"].items():
        print(f"{k:10} {s['n']:5d} {s['min']:7.4f} {s['p1']:7.4f} {s['p50']:7.4f} {s['p99']:7.4f}")
    print("\nshare of pairs at or above the threshold (collapsed by --dedup):")
    print(f"{'threshold':>9} " + " ".join(f"{k:>10}" for k in cos))
    for t, r in rows.items():
        print(f"{t:9.2f} " + " ".join(f"{100 * r[k]:9.1f}%" for k in cos) + ("   <- default" if t == DEFAULT_DEDUP
                                                                            else ""))


if __name__ == "__main__":
    main()
