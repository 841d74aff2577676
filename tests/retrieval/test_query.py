"""Weighted multi-queries, filters, the probability cut, de-duplication and sorting, against brute-force oracles."""
import fnmatch
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from itm.common.errors import QueryError
from itm.indexer.build import BuildOptions, build_index
from itm.models import calibration
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.models.fusion_checkpoint import save_reranker
from itm.models.registry import resolve_model
from itm.retrieval import search as search_module
from itm.retrieval.query import Filters, Part, Refine
from itm.retrieval.search import Searcher
from tests.conftest import write_images
from tests.indexer.test_metadata import exif_photo

CAMERAS = [("Canon", "EOS 5D"), ("Apple", "iPhone 12"), ("NIKON CORPORATION", "NIKON D750")]


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory):
    torch.manual_seed(0)
    model = FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval()
    return save_reranker(model, tmp_path_factory.mktemp("rr") / "reranker.safetensors")


@pytest.fixture(scope="module")
def index(tmp_path_factory, reranker_path):
    """24 images: 12 plain PNGs of two sizes, 12 JPEGs with EXIF (three cameras, dates over 2021-2023, rotated
    or not), two of them byte-identical copies; and 4 captions."""
    root = tmp_path_factory.mktemp("q")
    folder = root / "photos"
    write_images(folder / "png", 6, seed=1, size=(40, 48))
    write_images(folder / "png" / "wide", 6, seed=2, size=(48, 32))
    rng = np.random.default_rng(3)
    for i in range(12):
        make, model = CAMERAS[i % 3]
        path = exif_photo(folder / f"y{2021 + i % 3}" / f"cam{i:02d}.jpg", size=(40 + 4 * (i % 4), 36),
                          make=make, model=model, taken=f"{2021 + i % 3}:{1 + i % 12:02d}:1{i % 9} 12:00:00",
                          orientation=6 if i % 4 == 0 else 1)
        from PIL import Image
        Image.fromarray(rng.integers(0, 256, (36, 40 + 4 * (i % 4), 3), dtype=np.uint8)).save(
            path, "JPEG", exif=Image.open(path).getexif())
    shutil.copy(folder / "y2021" / "cam00.jpg", folder / "y2021" / "copy_a.jpg")
    shutil.copy(folder / "y2021" / "cam00.jpg", folder / "y2021" / "copy_b.jpg")
    (root / "caps.txt").write_text("a red square\na blue circle\na green star\na small yellow triangle\n")
    spec = resolve_model("itm-tiny", "random", reranker=reranker_path)
    idx = root / "idx"
    build_index(folder, idx, spec, BuildOptions(batch_size=8))
    build_index(root / "caps.txt", idx, spec)
    return idx


@pytest.fixture(scope="module")
def recall_only(index):
    return Searcher(index, rerank=False)


def test_parts_and_filters_parse():
    assert Part.parse("2:cat") == Part(2.0, "cat") and Part.parse("cat") == Part(1.0, "cat")
    assert Part.parse("0.5:./snow.jpg", -1, image=True) == Part(-0.5, None, "./snow.jpg")
    assert Part.parse("1:3:10 train") == Part(1.0, "3:10 train")
    with pytest.raises(QueryError, match="weight 0"):
        Part.parse("0:cat")
    f = Filters.parse(date="2024-03..", min_size="1920x1080", orientation="portrait")
    assert (f.date_from, f.date_to, f.min_width, f.min_height) == ("2024-03", None, 1920, 1080)
    assert Filters.parse(date="2022", min_size="500").to_json() == \
        {"date_from": "2022", "date_to": "2022", "min_width": 500, "min_height": 500}
    for bad in (dict(date="March"), dict(min_size="big"), dict(orientation="round")):
        with pytest.raises(QueryError):
            Filters.parse(**bad)
    with pytest.raises(QueryError, match="unknown filter"):
        Filters.from_json({"colour": "red"})


def all_images(s):
    snap = s.snapshot
    rows = snap.kind_rows("image")
    return snap, rows, snap.gather(rows, "emb")


def test_a_weighted_multi_query_recalls_by_the_hand_computed_combination(recall_only, index):
    s = recall_only
    photo = sorted((index.parent / "photos" / "png").glob("*.png"))[2]
    parts = [Part(2.0, "a blue circle"), Part(-1.0, "a green star"), Part(0.5, image=str(photo)),
             Part(-0.25, image=str(sorted((index.parent / "photos" / "png").glob("*.png"))[3]))]
    hits = s.search("a red square", k=8, parts=parts)
    # by hand: the unit embeddings of each part, weighted, summed and made unit
    e = s.encoder
    t = e.encode_texts(["a red square", "a blue circle", "a green star"]).emb
    i = np.concatenate([e.encode_images(e.load_pixels(Path(p.image))[None]).emb for p in parts[2:]])
    v = 1.0 * t[0] + 2.0 * t[1] - 1.0 * t[2] + 0.5 * i[0] - 0.25 * i[1]
    v /= np.linalg.norm(v)
    snap, rows, emb = all_images(s)
    sims = emb @ v
    best = np.argsort(-sims, kind="stable")[:8]
    assert [h.id for h in hits] == [snap.rows.column("id")[int(rows[j])].as_py() for j in best]
    np.testing.assert_allclose([h.score for h in hits], sims[best], rtol=1e-5, atol=1e-6)
    with pytest.raises(QueryError, match="cancel out"):
        s.search("a red square", parts=[Part(-1.0, "a red square")])
    with pytest.raises(QueryError, match="positive weight"):
        s.search(parts=[Part(-1.0, "a red square")])


def test_reranking_a_multi_query_averages_the_positive_texts_and_penalises_the_negative(index):
    s = Searcher(index)
    hits = s.search("a red square", k=5, rerank_k=10, parts=[Part(3.0, "a blue circle"), Part(-1.0, "a green star")])
    rows = np.array([int(np.flatnonzero(s.snapshot.rows.column("id").to_numpy() == h.id)[0]) for h in hits])
    one = {text: s.scorer.logits(s.snapshot.gather(rows, "tok"), f.tok, f.mask)
           for text, f in zip(["a red square", "a blue circle", "a green star"],
                              [s.encoder.encode_texts([x]) for x in ["a red square", "a blue circle", "a green star"]])}
    logit = 0.25 * one["a red square"] + 0.75 * one["a blue circle"]
    np.testing.assert_allclose([h.match_logit for h in hits], logit, atol=1e-4)
    penalty = 0.25 * np.maximum(one["a green star"], 0)
    np.testing.assert_allclose([h.score for h in hits],
                               [h.recall_score for h in hits] + s.scorer.weight * (logit - penalty), atol=1e-4)
    p = calibration.UNCALIBRATED.probability
    np.testing.assert_allclose([h.probability for h in hits], p(logit) * (1 - p(one["a green star"])), atol=1e-4)


def oracle(s, filters, query="a blue circle"):
    """Every image that passes, by checking each row's metadata in Python, ranked by exact cosine."""
    snap, rows, emb = all_images(s)
    q = s.encoder.encode_texts([query]).emb[0]
    out = []
    for r, e in zip(rows, emb):
        row = snap.rows.slice(int(r), 1).to_pylist()[0]
        path, w, h = os.fsdecode(row["path"]), row["width"], row["height"]
        date = row["taken"] or __import__("datetime").datetime.fromtimestamp(row["mtime_ns"] / 1e9).isoformat()
        cam = f"{row['camera_make'] or ''} {row['camera_model'] or ''}".lower()
        ok = ((filters.path is None or fnmatch.fnmatchcase(path, filters.path))
              and (filters.date_from is None or date[:len(filters.date_from)] >= filters.date_from)
              and (filters.date_to is None or date[:len(filters.date_to)] <= filters.date_to)
              and (filters.camera is None or all(word in cam for word in filters.camera.lower().split()))
              and (filters.min_width is None or w >= filters.min_width)
              and (filters.min_height is None or h >= filters.min_height)
              and (filters.orientation is None or {"landscape": w > h, "portrait": w < h,
                                                   "square": w == h}[filters.orientation]))
        if ok:
            out.append((-float(e @ q), row["id"]))
    return sorted(out)


FILTERS = [Filters(path="*/wide/*"), Filters.parse(date="2022"), Filters.parse(date="2021-05..2023-02"),
           Filters(camera="nikon"), Filters(camera="Apple iphone"), Filters.parse(min_size="44x40"),
           Filters(orientation="portrait"), Filters(orientation="landscape", path="*.jpg"),
           Filters.parse(date="..2022-06", camera="canon", orientation="landscape")]


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "deeper-ann"])
def test_filters_agree_with_a_brute_force_oracle_and_return_k_when_k_pass(recall_only, monkeypatch, exact):
    if not exact:  # every filter through the ANN index, searched deeper until enough pass
        monkeypatch.setattr(search_module, "EXACT_FILTERED", 0)
    for f in FILTERS:
        expected = oracle(recall_only, f)
        assert expected, f
        hits = recall_only.search("a blue circle", k=5, filters=f)
        assert len(hits) == min(5, len(expected)), f  # k hits whenever k pass, never fewer
        np.testing.assert_allclose([h.score for h in hits], [-s for s, _ in expected[:5]], atol=1e-5)
        assert len({h.id for h in hits}) == len(hits) and {h.id for h in hits} <= {i for _, i in expected}, f
    assert recall_only.search("a blue circle", filters=Filters(camera="leica")) == []


def test_filters_hold_after_reranking(index):
    s = Searcher(index)
    f = Filters(orientation="portrait", camera="canon")
    hits = s.search("a blue circle", k=3, rerank_k=3, filters=f)
    assert len(hits) == 3 and all(h.match_logit is not None for h in hits)
    assert {h.id for h in hits} <= {i for _, i in oracle(s, f)}


def test_min_prob_keeps_what_the_reranker_believes_and_is_refused_without_one(index, recall_only):
    s = Searcher(index)
    hits = s.search("a red square", k=30, rerank_k=30)
    probs = sorted(h.probability for h in hits)
    cut = probs[len(probs) // 2]
    kept = s.search("a red square", k=30, rerank_k=5, refine=Refine(min_prob=cut))
    assert kept and all(h.probability >= cut for h in kept)
    assert {h.id for h in kept} == {h.id for h in hits if h.probability >= cut}  # every candidate judged
    assert s.search("a red square", refine=Refine(min_prob=1.0)) == []  # no match: no hits, no error
    with pytest.raises(QueryError, match="needs the index's fusion reranker"):
        recall_only.search("a red square", refine=Refine(min_prob=0.5))
    texts = s.search(image=sorted((index.parent / "photos" / "png").glob("*.png"))[0], refine=Refine(min_prob=0.0))
    assert texts and {h.kind for h in texts} == {"text"}  # an image query judged against texts by default
    with pytest.raises(QueryError, match="pass --kind text"):
        s.search(image=sorted((index.parent / "photos" / "png").glob("*.png"))[0], kind="image",
                 refine=Refine(min_prob=0.5))


def test_dedup_hides_copies_and_counts_them(recall_only, index):
    s = recall_only
    photo = index.parent / "photos" / "y2021" / "cam00.jpg"
    plain = s.search(image=photo, kind="image", k=4)
    assert {os.path.basename(h.path) for h in plain[:3]} == {"cam00.jpg", "copy_a.jpg", "copy_b.jpg"}
    hits = s.search(image=photo, kind="image", k=4, refine=Refine(dedup=0.9999))  # the random tiny model: all close
    assert len(hits) == 4 and hits[0].duplicates == 2 and sum(h.duplicates for h in hits) == 2
    assert [h.id for h in hits[1:]] == [h.id for h in s.search(image=photo, kind="image", k=6)[3:6]]


def test_sort_by_date_and_path_after_the_cut(recall_only):
    s = recall_only
    f = Filters(path="*.jpg")
    ranked = s.search("a blue circle", k=6, filters=f)
    by_date = s.search("a blue circle", k=6, filters=f, refine=Refine(sort="date"))
    by_path = s.search("a blue circle", k=6, filters=f, refine=Refine(sort="path"))
    assert {h.id for h in by_date} == {h.id for h in ranked} == {h.id for h in by_path}
    rows = {r["id"]: r for r in s.snapshot.rows.to_pylist()}
    dates = [rows[h.id]["taken"] for h in by_date]
    assert dates == sorted(dates, reverse=True)
    assert [h.path for h in by_path] == sorted(h.path for h in ranked)


def test_the_query_is_declared_once_and_travels_whole():
    """The server's request schema presents exactly the Query's JSON form, and a query survives the trip from
    itm-search's options through the client's JSON and the server's parsing unchanged."""
    pytest.importorskip("fastapi")
    from itm.retrieval.query import JSON_FIELDS, Query
    from itm.retrieval.server import SearchRequest

    assert set(SearchRequest.model_fields) == JSON_FIELDS
    asked = Query("a dog", k=7, kind="all", rerank_k=20, rerank=False,
                  parts=(Part(2.0, text="snow"), Part(-0.5, image=b"\x89PNG", image_name="ref.png"), Part(1.0, image_id=3)),
                  filters=Filters.parse("*/2024/*", "2024-03..", "canon", "640x480", "landscape"),
                  refine=Refine(min_prob=0.25, sort="date", dedup=0.97)).checked()
    assert Query.from_json(SearchRequest(**asked.to_json()).model_dump()) == asked


@pytest.mark.parametrize("change, message", [
    ({"text": None}, "give one query"), ({"image_id": 4}, "give one query"), ({"k": 0}, "k must be"),
    ({"rerank_k": 0}, "rerank_k must be"), ({"kind": "video"}, "unknown kind"),
    ({"refine": Refine(sort="size")}, "unknown sort"), ({"parts": (Part(1.0),)}, "each part"),
])
def test_a_query_says_what_is_wrong_with_it(change, message):
    from dataclasses import replace

    from itm.retrieval.query import Query

    with pytest.raises(QueryError, match=message):
        replace(Query("a dog"), **change).checked()
    with pytest.raises(QueryError, match="between 1 and 100"):
        Query("a dog", k=101).checked(max_k=100)
