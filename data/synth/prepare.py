"""Write the synthetic dataset to disk.

    python -m itm.data.synth.prepare --out out/synth --train 8000 --val 500 --test 1000 --seed 0 --size 64

Layout under --out:
    images/{split}/{image_id}.png
    captions.jsonl          {"image", "caption", "split"} per caption
    hard_negatives.jsonl    {"image", "caption", "negative", "held_out", "kind"} per test caption
    dataset_karpathy.json   COCO/Flickr30k Karpathy layout; each sentence also carries
                            its hard negative ("negative", "negative_kind"), its other
                            false edits ("more_negatives") and its grounded phrases
                            ("phrases": span and grid cell of each mention), each image
                            its scene (for truth checks) and its twin, if any

--twin-fraction makes that share of train and val image pairs confusable twins (hard
negative images for training); the test split is the same whatever it is.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from .captions import grounded_phrases, parse_caption
from .dataset import SPLITS, Sample, generate_split
from .world import GRID, Obj, Scene

CHUNK = 500            # images per job; even, so test twin pairs never straddle jobs
PNG_OPTIONS = {"compress_level": 3}   # faster than the default and no larger here


@dataclass(frozen=True)
class PrepareSummary:
    out: Path
    counts: dict[str, int]
    captions: int
    held_out_test: int
    twins_test: int
    seconds: float


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _write_chunk(job: tuple[Path, str, int, int, int, int, int, int, float]) -> list[Sample]:
    out, split, n, seed, size, per_image, start, stop, twin_fraction = job
    samples = generate_split(split, n, seed, image_size=size, captions_per_image=per_image,
                             start=start, stop=stop, twin_fraction=twin_fraction)
    for s in samples:
        s.render().save(out / "images" / split / f"{s.image_id}.png", **PNG_OPTIONS)
    return samples


def _image_path(s: Sample) -> str:
    return f"images/{s.split}/{s.image_id}.png"


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _karpathy(samples: list[Sample]) -> dict:
    images, sentid = [], 0
    for imgid, s in enumerate(samples):
        sentences = []
        for raw, neg, kind, more in zip(s.captions, s.hard_negatives, s.negative_kinds, s.more_negatives):
            sentences.append({"raw": raw, "tokens": _tokens(raw), "imgid": imgid, "sentid": sentid,
                              "negative": neg, "negative_kind": kind, "more_negatives": list(more),
                              "phrases": _phrases(s.scene, raw)})
            sentid += 1
        images.append({
            "filepath": f"images/{s.split}", "filename": f"{s.image_id}.png", "split": s.split,
            "imgid": imgid, "sentids": [x["sentid"] for x in sentences], "sentences": sentences,
            "held_out": s.held_out, "twin": None if s.twin_id is None else f"{s.twin_id}.png",
            "twin_kind": s.twin_kind, "scene": scene_to_dict(s.scene),
        })
    return {"dataset": "synth", "images": images}


def _phrases(scene: Scene, raw: str) -> list[dict]:
    """Each mention's character span and the grid cell of its object, as fractions of the image."""
    return [{"span": [start, end], "box": [obj.col / GRID, obj.row / GRID, (obj.col + 1) / GRID, (obj.row + 1) / GRID]}
            for start, end, obj in grounded_phrases(scene, raw)]


def _write_metadata(out: Path, samples: list[Sample]) -> None:
    _write_jsonl(out / "captions.jsonl", (
        {"image": _image_path(s), "caption": c, "split": s.split} for s in samples for c in s.captions))
    _write_jsonl(out / "hard_negatives.jsonl", (
        {"image": _image_path(s), "caption": c, "negative": n, "held_out": s.held_out, "kind": k}
        for s in samples if s.split == "test"
        for c, n, k in zip(s.captions, s.hard_negatives, s.negative_kinds)))
    (out / "dataset_karpathy.json").write_text(json.dumps(_karpathy(samples)), encoding="utf-8")


def prepare(out: Path, counts: Mapping[str, int], seed: int, *, image_size: int = 64,
            captions_per_image: int = 5, workers: int = 1, twin_fraction: float = 0.0) -> PrepareSummary:
    """Generate the splits in `counts` ({"train": N, ...}) and write them under `out`."""
    t0 = time.perf_counter()
    jobs = []
    for split in SPLITS:
        n = counts.get(split, 0)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        twins = 0.0 if split == "test" else twin_fraction
        jobs += [(out, split, n, seed, image_size, captions_per_image, a, a + CHUNK, twins)
                 for a in range(0, n, CHUNK)]
    if workers > 1 and len(jobs) > 1:
        with get_context("fork").Pool(workers) as pool:
            chunks = pool.map(_write_chunk, jobs, chunksize=1)
    else:
        chunks = [_write_chunk(j) for j in jobs]
    samples = [s for chunk in chunks for s in chunk]
    _write_metadata(out, samples)
    test = [s for s in samples if s.split == "test"]
    return PrepareSummary(out, {sp: counts.get(sp, 0) for sp in SPLITS},
                          sum(len(s.captions) for s in samples), sum(s.held_out for s in test),
                          sum(s.twin_id is not None for s in test), time.perf_counter() - t0)


def scene_to_dict(scene: Scene) -> dict:
    return {"background": scene.background, "objects": [asdict(o) for o in scene.objects]}


def scene_from_dict(d: dict) -> Scene:
    return Scene(tuple(Obj(**o) for o in d["objects"]), d["background"])


def _corpus_caption(s: Sample) -> str:
    return next((c for c in s.captions if parse_caption(c).relation is not None), s.captions[0])


def write_samples(out: Path, n_images: int, seed: int, *, image_size: int = 64) -> list[Sample]:
    """A small test-style corpus: images/*.png (optimised), captions.txt, samples.jsonl.

    captions.txt holds one caption per image, in image order: the first that
    relates two objects (so that an image and its twin differ), else the first.
    """
    samples = generate_split("test", n_images, seed, image_size=image_size)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for s in samples:
        s.render().save(out / "images" / f"{s.image_id}.png", optimize=True)
    (out / "captions.txt").write_text("".join(_corpus_caption(s) + "\n" for s in samples), encoding="utf-8")
    _write_jsonl(out / "samples.jsonl", (
        {"image": f"images/{s.image_id}.png", "captions": list(s.captions),
         "hard_negatives": list(s.hard_negatives), "held_out": s.held_out,
         "twin": None if s.twin_id is None else f"images/{s.twin_id}.png", "twin_kind": s.twin_kind}
        for s in samples))
    return samples


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the synthetic image-caption dataset.")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--train", type=int, default=8000, help="number of training images")
    p.add_argument("--val", type=int, default=500, help="number of validation images")
    p.add_argument("--test", type=int, default=1000, help="number of test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="processes writing images")
    p.add_argument("--twin-fraction", type=float, default=0.0, help="share of train/val pairs that are twins")
    a = p.parse_args(argv)
    r = prepare(a.out, {"train": a.train, "val": a.val, "test": a.test}, a.seed,
                image_size=a.size, captions_per_image=a.captions_per_image, workers=a.workers,
                twin_fraction=a.twin_fraction)
    per_split = ", ".join(f"{k} {v}" for k, v in r.counts.items())
    print(f"wrote {sum(r.counts.values())} images ({per_split}), "
          f"{r.captions} captions, {r.held_out_test} held-out and {r.twins_test} twin test images "
          f"to {r.out} in {r.seconds:.1f}s")


if __name__ == "__main__":
    main()
