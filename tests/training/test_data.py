"""Image-caption datasets: caption tables read by the scanner's table reader, Karpathy-split JSON."""
import json

import pytest

from itm.common.errors import CorpusError
from itm.training.data import load_dataset


def loaded(path, **kwargs):
    skips = []
    data = load_dataset(path, on_skip=lambda p, why: skips.append((p, why)), **kwargs)
    return [(d.image.name, d.captions) for d in data], skips


def test_bad_jsonl_lines_are_skipped_with_a_reason(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"image": "a.png", "caption": "a red circle"}\n'
                     b'{"image": "b.png", "caption": "cut off\n'
                     b'["a list"]\n'
                     b'{"image": "b.png"}\n'
                     b'{"image": "b.png", "caption": "caf\xe9"}\n'
                     b'{"image": "b.png", "caption": "a blue square", "split": "train"}\n'
                     b'{"image": "c.png", "caption": "not this split", "split": "test"}\n')
    data, skips = loaded(path)
    assert data == [("a.png", ("a red circle",)), ("b.png", ("a blue square",))]
    assert skips == [(path, "line 2: invalid JSON"), (path, "line 3: not a JSON object"),
                     (path, "line 4: no 'caption' or 'text' field"), (path, "line 5: not valid UTF-8")]


def test_csv_rows_without_an_image_or_a_caption_are_skipped(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'filepath,text\na.png,"a caption, with a comma"\n,an orphan caption\nb.png,\n'
                     b'b.png,"two\nlines"\nb.png,caf\xe9\nc.png,three\n')
    data, skips = loaded(path)
    assert data == [("a.png", ("a caption, with a comma",)), ("b.png", ("two\nlines",)), ("c.png", ("three",))]
    assert skips == [(path, "line 3: no 'filepath' value"), (path, "line 4: empty 'text'"),
                     (path, "line 7: not valid UTF-8")]


def test_unusable_tables_are_one_clear_error(tmp_path):
    (tmp_path / "bad.csv").write_text('image,caption\na.png,ok\na.png,"' + "x" * 200_000 + '"\n')
    with pytest.raises(CorpusError, match="bad.csv: line 3: cannot parse CSV"):
        load_dataset(tmp_path / "bad.csv")
    (tmp_path / "cols.jsonl").write_text('{"picture": "a.png", "caption": "x"}\n')
    with pytest.raises(CorpusError, match="needs an image column .* it has picture, caption"):
        load_dataset(tmp_path / "cols.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CorpusError, match="holds no rows"):
        load_dataset(tmp_path / "empty.jsonl")


def test_karpathy_negatives_twins_and_broken_entries(tmp_path):
    images = [
        {"filepath": "imgs", "filename": "0.png", "split": "test", "twin": "1.png",
         "sentences": [{"raw": " a red circle "}, {"raw": "a blue star", "negative": "a red star"}]},
        {"filepath": "imgs", "filename": "1.png", "split": "test", "sentences": [{"raw": "a green square"}]},
        {"filepath": "imgs", "split": "test", "sentences": [{"raw": "no file name"}]},
        {"filepath": "imgs", "filename": "3.png", "split": "train", "sentences": [{"raw": "x"}]},
    ]
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"images": images}))
    skips = []
    data = load_dataset(path, split="test", on_skip=lambda p, why: skips.append(why))
    assert [d.image for d in data] == [tmp_path / "imgs" / "0.png", tmp_path / "imgs" / "1.png"]
    assert data[0].captions == ("a red circle", "a blue star") and data[0].negatives == (None, "a red star")
    assert data[0].hard_images == (tmp_path / "imgs" / "1.png",) and data[1].negatives == ()
    assert skips == ["image 3: no 'filename'"]


def test_karpathy_more_negatives(tmp_path):
    images = [
        {"filename": "0.png", "split": "train",
         "sentences": [{"raw": "a red circle", "more_negatives": [" a blue circle ", "a red star"]},
                       {"raw": "a star"}]},
        {"filename": "1.png", "split": "train", "sentences": [{"raw": "a red circle"}]},
        {"filename": "2.png", "split": "train", "sentences": [{"raw": "a red circle", "more_negatives": "a star"}]},
        {"filename": "3.png", "split": "train", "sentences": [{"raw": "a red circle", "more_negatives": ["", "x"]}]},
    ]
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"images": images}))
    skips = []
    data = load_dataset(path, on_skip=lambda p, why: skips.append(why))
    assert [d.more_negatives for d in data] == [(("a blue circle", "a red star"), ()), ()]
    assert [s.split(":")[0] for s in skips] == ["image 3", "image 4"] and "list of non-empty strings" in skips[0]


def test_karpathy_grounded_phrases(tmp_path):
    box = [0.0, 0.5, 0.5, 1.0]
    images = [
        {"filename": "0.png", "split": "train",
         "sentences": [{"raw": "  a red circle left of a star", "phrases": [{"span": [2, 14], "box": box}]},
                       {"raw": "a star"}]},
        {"filename": "1.png", "split": "train",
         "sentences": [{"raw": "a red circle", "phrases": [{"span": [2, 40], "box": box}]}]},
        {"filename": "2.png", "split": "train",
         "sentences": [{"raw": "a red circle", "phrases": [{"span": [2, 12], "box": [0.5, 0, 0.2, 1]}]}]},
        {"filename": "3.png", "split": "train", "sentences": [{"raw": "a red circle", "phrases": [{"box": box}]}]},
    ]
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"images": images}))
    skips = []
    data = load_dataset(path, on_skip=lambda p, why: skips.append(why))
    assert len(data) == 1
    (phrase,), none = data[0].phrases
    assert data[0].captions[0][phrase.start:phrase.end] == "a red circle" and phrase.box == tuple(box) and none == ()
    assert [s.split(":")[0] for s in skips] == ["image 2", "image 3", "image 4"]
    assert "does not fit" in skips[0] and "does not fit" in skips[1] and skips[2] == "image 4: no 'span'"
