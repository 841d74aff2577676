"""Image-caption datasets for training and evaluation: caption tables and Karpathy-split JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from itm.common.errors import CorpusError
from itm.indexer.scan import TABLE_EXTENSIONS, read_records

IMAGE_KEYS = ("image", "filepath", "file", "path")
CAPTION_KEYS = ("caption", "text")

OnSkip = Callable[[Path, str], None]


@dataclass(frozen=True)
class Phrase:
    """A span of a caption and the box of the image it names, as phrase-grounding data gives them."""

    start: int  # first character of the phrase in the caption
    end: int  # one past its last character
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image's width and height


@dataclass(frozen=True)
class ImageCaptions:
    image: Path  # absolute path of the image file
    captions: tuple[str, ...]  # every caption of this image
    negatives: tuple[str | None, ...] = ()  # a false caption worded like each caption, where the data has one
    hard_images: tuple[Path, ...] = ()  # images known to be confusable with this one (none of its captions fit)
    phrases: tuple[tuple[Phrase, ...], ...] = ()  # per caption, its grounded phrases, where the data has them
    # per caption, a false caption the text tower must keep apart from it in its tokens only
    # (TrainOptions.token_margin), not in the pooled embedding: a relation flip, where images look alike to it
    token_negatives: tuple[str | None, ...] = ()
    # per caption, more false captions worded like it, beside `negatives` (TrainOptions.more_negatives draws from them)
    more_negatives: tuple[tuple[str, ...], ...] = ()


def load_dataset(path: Path | str, image_root: Path | str | None = None, split: str = "train",
                 on_skip: OnSkip | None = None) -> list[ImageCaptions]:
    """Images with their captions, from a Karpathy-split JSON (COCO, Flickr30k) or a caption table.

    A caption table (.jsonl, .csv, .parquet) has an image path column (image/filepath/file/path)
    and a caption column (caption/text), one row per caption; its `split` column, if any, is
    filtered on. Relative image paths are taken from `image_root` (default: the file's folder).
    Karpathy split "train" includes "restval", as is usual. Karpathy sentences may carry a
    "negative" (a false caption of the image, used as a hard negative in training), "more_negatives"
    (a list of other false captions, drawn from as more hard negatives) and "phrases"
    ([{"span": [start, end], "box": [x0, y0, x1, y1]}]: character spans of the raw sentence and the
    boxes they name, as fractions of the image size, as Flickr30k Entities grounds phrases), and
    images a "twin" (a confusable image of the same split, used as a hard negative image). A line or
    entry that cannot be used is reported as on_skip(path, "line N: reason") and left out.

    >>> load_dataset("captions.jsonl", split="test")[0].captions
    ('a red circle left of a blue square',)
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    if not path.is_file():
        raise CorpusError(f"dataset file {path} not found")

    def report(reason: str) -> None:
        if on_skip is not None:
            on_skip(path, reason)

    if path.suffix.lower() == ".json":
        return _karpathy(path, root, split, report)
    if path.suffix.lower() not in TABLE_EXTENSIONS:
        raise CorpusError(f"{path}: unsupported dataset file; use a Karpathy .json, or .jsonl/.csv/.parquet")
    return _caption_table(path, root, split, report)


def _caption_table(path: Path, root: Path, split: str, report: Callable[[str], None]) -> list[ImageCaptions]:
    records = read_records(path)
    if not records.good:
        raise CorpusError(f"{path} holds no rows")
    columns = records.columns or []
    ikey = next((k for k in IMAGE_KEYS if k in columns), None)
    ckey = next((k for k in CAPTION_KEYS if k in columns), None)
    if ikey is None or ckey is None:
        raise CorpusError(f"{path} needs an image column ({'/'.join(IMAGE_KEYS)}) and a caption column "
                          f"({'/'.join(CAPTION_KEYS)}); it has {', '.join(columns)}")
    grouped: dict[Path, list[str]] = {}
    skipped = list(records.bad)
    for number, r in records.good:
        if "split" in r and split and r["split"] != split:
            continue
        problem = _caption_row_problem(r, ikey, ckey)
        if problem:
            skipped.append((number, problem))
        else:
            grouped.setdefault((root / r[ikey]).resolve(), []).append(r[ckey].strip())
    for number, reason in sorted(skipped):
        report(f"{records.unit} {number}: {reason}")
    return [ImageCaptions(p, tuple(c)) for p, c in grouped.items()]


def _caption_row_problem(r: dict[str, Any], ikey: str, ckey: str) -> str | None:
    if ckey not in r:
        return f"no {' or '.join(repr(k) for k in CAPTION_KEYS)} field"
    if not isinstance(r.get(ikey), str) or not r[ikey].strip():
        return f"no {ikey!r} value"
    if not isinstance(r[ckey], str) or not r[ckey].strip():
        return f"empty {ckey!r}"
    return None


def _karpathy(path: Path, root: Path, split: str, report: Callable[[str], None]) -> list[ImageCaptions]:
    try:
        images = json.loads(path.read_text())["images"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CorpusError(f"{path} is not a Karpathy-split JSON file ({e})") from None
    splits = {"train", "restval"} if split == "train" else {split}
    out = []
    for number, im in enumerate(images, start=1):
        if not isinstance(im, dict) or im.get("split") not in splits:
            continue
        try:
            out.append(_karpathy_image(im, root))
        except KeyError as e:
            report(f"image {number}: no {e}")
        except (TypeError, AttributeError, ValueError) as e:
            report(f"image {number}: malformed ({e})")
    return out


def _karpathy_image(im: dict[str, Any], root: Path) -> ImageCaptions:
    folder = root / im.get("filepath", "")
    sentences = im["sentences"]
    negatives = tuple(s.get("negative") for s in sentences)
    phrases = tuple(_phrases(s) for s in sentences)
    more = tuple(_texts(s.get("more_negatives") or ()) for s in sentences)
    twin = (folder / im["twin"]).resolve() if im.get("twin") else None
    return ImageCaptions((folder / im["filename"]).resolve(), tuple(s["raw"].strip() for s in sentences),
                         negatives if any(negatives) else (), (twin,) if twin else (),
                         phrases if any(phrases) else (), more_negatives=more if any(more) else ())


def _texts(values: Any) -> tuple[str, ...]:
    """A list of non-empty strings, stripped; TypeError otherwise."""
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in values):
        raise TypeError(f"expected a list of non-empty strings, got {values!r}")
    return tuple(v.strip() for v in values)


def _phrases(sentence: dict[str, Any]) -> tuple[Phrase, ...]:
    """A Karpathy sentence's grounded phrases, with spans moved to its stripped caption; TypeError if malformed."""
    raw = sentence["raw"]
    lead, n = len(raw) - len(raw.lstrip()), len(raw.strip())
    out = []
    for p in sentence.get("phrases") or ():
        (start, end), box = p["span"], tuple(float(v) for v in p["box"])
        start, end = int(start) - lead, int(end) - lead
        if not (0 <= start < end <= n and len(box) == 4 and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise TypeError(f"phrase {p} does not fit its sentence or the unit square")
        out.append(Phrase(start, end, box))  # type: ignore[arg-type]
    return tuple(out)
