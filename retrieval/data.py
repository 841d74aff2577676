"""Image-caption datasets for training and evaluation: caption files and Karpathy-split JSON."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from indexer.errors import CorpusError

IMAGE_KEYS = ("image", "filepath", "file", "path")
CAPTION_KEYS = ("caption", "text")


@dataclass(frozen=True)
class ImageCaptions:
    image: Path  # absolute path of the image file
    captions: tuple[str, ...]  # every caption of this image
    negatives: tuple[str | None, ...] = ()  # a false caption worded like each caption, where the data has one
    hard_images: tuple[Path, ...] = ()  # images known to be confusable with this one (none of its captions fit)


def load_dataset(path: Path | str, image_root: Path | str | None = None, split: str = "train") -> list[ImageCaptions]:
    """Images with their captions, from a Karpathy-split JSON (COCO, Flickr30k) or a caption table.

    A caption table (.jsonl, .csv, .parquet) has an image path column (image/filepath/file/path)
    and a caption column (caption/text), one row per caption; its `split` column, if any, is
    filtered on. Relative image paths are taken from `image_root` (default: the file's folder).
    Karpathy split "train" includes "restval", as is usual. Karpathy sentences may carry a
    "negative" (a false caption of the image, used as a hard negative in training) and images a
    "twin" (a confusable image of the same split, used as a hard negative image).
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    if not path.is_file():
        raise CorpusError(f"dataset file {path} not found")
    if path.suffix == ".json":
        return _karpathy(path, root, split)
    rows = _table(path)
    if not rows:
        raise CorpusError(f"{path} holds no rows")
    ikey = next((k for k in IMAGE_KEYS if k in rows[0]), None)
    ckey = next((k for k in CAPTION_KEYS if k in rows[0]), None)
    if ikey is None or ckey is None:
        raise CorpusError(f"{path} needs an image column ({'/'.join(IMAGE_KEYS)}) and a caption column "
                          f"({'/'.join(CAPTION_KEYS)}); it has {', '.join(rows[0])}")
    grouped: dict[Path, list[str]] = {}
    for r in rows:
        if "split" in r and split and r["split"] != split:
            continue
        if r.get(ikey) and isinstance(r.get(ckey), str) and r[ckey].strip():
            grouped.setdefault((root / r[ikey]).resolve(), []).append(r[ckey].strip())
    return [ImageCaptions(p, tuple(c)) for p, c in grouped.items()]


def _karpathy(path: Path, root: Path, split: str) -> list[ImageCaptions]:
    try:
        images = json.loads(path.read_text())["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorpusError(f"{path} is not a Karpathy-split JSON file ({e})") from None
    splits = {"train", "restval"} if split == "train" else {split}
    out = []
    for im in images:
        if im.get("split") in splits:
            folder = root / im.get("filepath", "")
            sentences = im["sentences"]
            negatives = tuple(s.get("negative") for s in sentences)
            twin = (folder / im["twin"]).resolve() if im.get("twin") else None
            out.append(ImageCaptions((folder / im["filename"]).resolve(), tuple(s["raw"].strip() for s in sentences),
                                     negatives if any(negatives) else (), (twin,) if twin else ()))
    return out


def _table(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8-sig") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    raise CorpusError(f"{path}: unsupported dataset file; use a Karpathy .json, or .jsonl/.csv/.parquet")
