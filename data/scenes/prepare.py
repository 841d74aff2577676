"""Write the photo-like world's splits to disk.

    python -m itm.data.scenes.prepare OUT --train 8000 --val 500 --test 1000 --seed 0 --size 160

Layout under OUT:
    images/{split}/{image_id}.png
    dataset_karpathy.json   COCO/Flickr30k Karpathy layout, as the training code reads it; each
                            sentence also carries its hard negative ("negative", "negative_kind"),
                            the other kinds' false captions ("more_negatives") and its grounded
                            phrases ("phrases": span of each mention and the box around its things),
                            each image its scene and its twin, if any
    captions.txt            one caption per image, in image order (the first that relates two
                            things, else the first): a text corpus for image -> text search
    samples.jsonl           per image: its true captions, hard negatives and their kinds, twin
"""
from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

from .captions import members, noun_phrase, parse_caption
from .dataset import SPLITS, Sample, generate_split
from .world import Scene, Thing

CHUNK = 200            # images per job; even, so twin pairs never straddle jobs
PNG_OPTIONS = {"compress_level": 3}   # much faster than the default, a little larger


def _write_chunk(job: tuple[Path, str, int, int, int, int, int, int, float]) -> list[Sample]:
    out, split, n, seed, size, per_image, start, stop, twin_fraction = job
    samples = generate_split(split, n, seed, image_size=size, captions_per_image=per_image, start=start,
                             stop=stop, twin_fraction=twin_fraction if split != "test" else None)
    for s in samples:
        s.render().save(out / _image_path(s), **PNG_OPTIONS)
    return samples


def _image_path(s: Sample) -> str:
    return f"images/{s.split}/{s.image_id}.png"


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def phrases(scene: Scene, raw: str) -> list[dict]:
    """Each mention's character span in `raw` and the box around the things it names (fractions)."""
    out = []
    for m in parse_caption(raw).mentions:
        found = re.search(rf"\b{re.escape(noun_phrase(m))}\b", raw)
        things = [scene.things[k] for k in members(scene, m)]
        if found is None or not things:
            continue
        box = [max(0.0, min(t.box[0] for t in things)), max(0.0, min(t.box[1] for t in things)),
               min(1.0, max(t.box[2] for t in things)), min(1.0, max(t.box[3] for t in things))]
        out.append({"span": [found.start(), found.end()], "box": box})
    return out


def scene_to_dict(scene: Scene) -> dict:
    return {"place": scene.place, "things": [asdict(t) for t in scene.things]}


def scene_from_dict(d: dict) -> Scene:
    return Scene(d["place"], tuple(Thing(**{**t, "box": tuple(t["box"])}) for t in d["things"]))


def _karpathy(samples: list[Sample]) -> dict:
    images, sentid = [], 0
    for imgid, s in enumerate(samples):
        sentences = []
        for raw, neg, kind, more in zip(s.captions, s.hard_negatives, s.negative_kinds, s.more_negatives):
            sentences.append({"raw": raw, "tokens": re.findall(r"[a-z]+", raw), "imgid": imgid, "sentid": sentid,
                              "negative": neg, "negative_kind": kind, "more_negatives": list(more),
                              "phrases": phrases(s.scene, raw)})
            sentid += 1
        images.append({
            "filepath": f"images/{s.split}", "filename": f"{s.image_id}.png", "split": s.split, "imgid": imgid,
            "sentids": [x["sentid"] for x in sentences], "sentences": sentences, "held_out": s.held_out,
            "twin": None if s.twin_id is None else f"{s.twin_id}.png", "twin_kind": s.twin_kind,
            "scene": scene_to_dict(s.scene),
        })
    return {"dataset": "scenes", "images": images}


def _corpus_caption(s: Sample) -> str:
    return next((c for c in s.captions if parse_caption(c).relation is not None), s.captions[0])


def _write_metadata(out: Path, samples: list[Sample]) -> None:
    (out / "dataset_karpathy.json").write_text(json.dumps(_karpathy(samples)), encoding="utf-8")
    (out / "captions.txt").write_text("".join(_corpus_caption(s) + "\n" for s in samples), encoding="utf-8")
    _write_jsonl(out / "samples.jsonl", (
        {"image": _image_path(s), "split": s.split, "captions": list(s.captions),
         "hard_negatives": list(s.hard_negatives), "negative_kinds": list(s.negative_kinds),
         "held_out": s.held_out, "twin": None if s.twin_id is None else f"images/{s.split}/{s.twin_id}.png",
         "twin_kind": s.twin_kind}
        for s in samples))


def prepare(out: Path, counts: Mapping[str, int], seed: int, *, image_size: int = 160, captions_per_image: int = 5,
            workers: int = 1, twin_fraction: float = 0.0) -> list[Sample]:
    """Make the splits in `counts` ({"train": N, ...}), write them under `out`, and return their samples."""
    jobs = []
    for split in SPLITS:
        n = counts.get(split, 0)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs += [(out, split, n, seed, image_size, captions_per_image, a, a + CHUNK, twin_fraction)
                 for a in range(0, n, CHUNK)]
    if workers > 1 and len(jobs) > 1:
        with get_context("fork").Pool(workers) as pool:
            chunks = pool.map(_write_chunk, jobs, chunksize=1)
    else:
        chunks = [_write_chunk(j) for j in jobs]
    samples = [s for chunk in chunks for s in chunk]
    _write_metadata(out, samples)
    return samples


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the photo-like synthetic image-caption dataset.")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--train", type=int, default=8000, help="number of training images")
    p.add_argument("--val", type=int, default=500, help="number of validation images")
    p.add_argument("--test", type=int, default=1000, help="number of test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=160, help="image side in pixels")
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="processes writing images")
    p.add_argument("--twin-fraction", type=float, default=0.0, help="share of train/val pairs that are twins")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    samples = prepare(a.out, {"train": a.train, "val": a.val, "test": a.test}, a.seed, image_size=a.size,
                      captions_per_image=a.captions_per_image, workers=a.workers, twin_fraction=a.twin_fraction)
    test = [s for s in samples if s.split == "test"]
    print(f"wrote {len(samples)} images (train {a.train}, val {a.val}, test {a.test}), "
          f"{sum(len(s.captions) for s in samples)} captions, {sum(s.held_out for s in test)} held-out and "
          f"{sum(s.twin_id is not None for s in test)} twin test images to {a.out} "
          f"in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
