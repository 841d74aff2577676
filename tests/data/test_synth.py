"""Synthetic world: truth of captions, falsity of negatives, splits, twins, files on disk."""
from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itm.data.synth import (
    HELD_OUT,
    CaptionParts,
    Mention,
    Obj,
    Position,
    Scene,
    caption_matches,
    describe,
    generate_split,
    hard_negative,
    negative_parts,
    parse_caption,
    render_caption,
    render_scene,
    sample_scene,
)
from itm.data.synth.captions import caption_kind, mentions_held_out, why_false
from itm.data.synth.prepare import main as prepare_main
from itm.data.synth.prepare import prepare

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"
SWAP_KINDS = {"colour_swap", "shape_swap", "size_swap"}


@lru_cache(maxsize=None)
def split(name: str, n: int = 200, seed: int = 11):
    return tuple(generate_split(name, n, seed))


def words(text: str) -> list[str]:
    return sorted(w for w in re.findall(r"[a-z]+", text) if w not in ("a", "an"))


# A red circle (middle left) and a blue square (top right).
SCENE = Scene((Obj("red", "circle", "small", 1, 0), Obj("blue", "square", "large", 0, 2)), "sand")


@pytest.mark.parametrize("text, truth", [
    ("a red circle left of a blue square", True),
    ("a small red circle is to the left of a large blue square", True),
    ("a blue square higher than a red circle", True),
    ("a red circle below a blue square", True),
    ("a red circle right of a blue square", False),        # relation flip
    ("a red circle above a blue square", False),
    ("a blue circle left of a red square", False),         # colour binding swap
    ("a red square left of a blue circle", False),         # shape binding swap
    ("a large red circle left of a small blue square", False),   # size binding swap
    ("a red circle that is small", True),
    ("a red circle that is large", False),
    ("there is a red circle on the left", True),
    ("there is a red circle on the right", False),
    ("a blue square in the top right corner", True),
    ("a blue square at the bottom", False),
    ("a red circle in the middle row", True),
    ("a blue square and a red circle", True),
    ("a blue square and a green circle", False),
])
def test_checker_on_hand_written_captions(text, truth):
    assert caption_matches(SCENE, parse_caption(text)) is truth


@pytest.mark.parametrize("text, why", [
    ("a red circle right of a blue square", "where"),
    ("there is a red circle on the right", "where"),
    ("a large red circle left of a blue square", "size"),
    ("a red star left of a blue square", "shape"),
    ("a blue square and a green circle", "colour"),
    ("a blue circle left of a red square", "binding"),  # colours (or shapes) exchanged between the objects
    ("a green star left of a blue square", "several"),
    ("a red circle left of a blue square and a green star", "several"),  # a third object that is not there
])
def test_why_a_caption_is_false(text, why):
    parts = parse_caption(text)
    assert not caption_matches(SCENE, parts)
    assert why_false(SCENE, parts) == why


@pytest.mark.parametrize("text, kind", [
    ("a red circle that is small", "one object"),
    ("there is a red circle on the left", "one object, position"),
    ("a blue square and a red circle", "two objects"),
    ("a red circle left of a blue square", "two objects, relation"),
    ("a red circle left of a blue square and a green star", "three objects, relation"),
])
def test_caption_kinds(text, kind):
    assert caption_kind(parse_caption(text)) == kind


def test_parser_reads_what_the_grammar_writes():
    rng = np.random.default_rng(0)
    for _ in range(400):
        scene = sample_scene(rng)
        parts = describe(scene, rng)
        assert parse_caption(render_caption(parts)) == parts.meaning()


def test_parser_rejects_text_without_objects():
    with pytest.raises(ValueError, match="no colour-shape"):
        parse_caption("a dog on a beach")


def test_hard_negative_of_single_relation_is_its_flip_or_a_swap():
    parts = CaptionParts((Mention("red", "circle"), Mention("blue", "square")), "left")
    seen = set()
    for seed in range(30):
        neg = hard_negative(SCENE, parts, np.random.default_rng(seed))
        assert not caption_matches(SCENE, parse_caption(neg))
        assert neg.startswith("a ") and len(neg.split()) == 8
        seen.add(neg)
    assert "a red circle right of a blue square" in seen
    assert "a blue circle left of a red square" in seen


def test_single_object_negative_flips_position():
    scene = Scene((Obj("green", "star", "large", 2, 0),), "slate")
    parts = CaptionParts((Mention("green", "star"),), None, Position(row=2, col=0))
    neg, kind = negative_parts(scene, parts, np.random.default_rng(0))
    assert kind == "position_flip" and not caption_matches(scene, neg)


@pytest.mark.parametrize("name", ["train", "val", "test"])
def test_captions_true_and_negatives_false(name):
    for s in split(name):
        assert len(s.captions) == 5 == len(set(s.captions)) == len(s.hard_negatives)
        for cap, neg, kind in zip(s.captions, s.hard_negatives, s.negative_kinds):
            assert caption_matches(s.scene, parse_caption(cap)), cap
            assert not caption_matches(s.scene, parse_caption(neg)), (cap, neg)
            if kind in SWAP_KINDS:
                assert words(cap) == words(neg)   # same words, different binding


@pytest.mark.parametrize("name", ["train", "test"])
def test_more_negatives_are_false_distinct_and_keep_held_out_pairs_out_of_training(name):
    edits = set()
    for s in split(name):
        assert len(s.more_negatives) == len(s.captions)
        for cap, neg, more in zip(s.captions, s.hard_negatives, s.more_negatives):
            assert more and len(set(more)) == len(more) and neg not in more and cap not in more
            for text in more:
                parts = parse_caption(text)
                assert not caption_matches(s.scene, parts), (cap, text)
                assert name == "test" or not mentions_held_out(parts)
                said, changed = parse_caption(cap).mentions, parts.mentions
                edits |= {a for m, n in zip(said, changed) for a in ("size", "shape") if getattr(m, a) != getattr(n, a)}
    assert edits == {"size", "shape"}  # one mention's size flipped or shape changed, among the rest


def test_more_negatives_leave_the_rest_of_a_split_as_it_was(monkeypatch):
    """They are drawn from a stream of their own: captions and hard negatives do not depend on them."""
    from itm.data.synth import dataset

    with_more = generate_split("train", 12, seed=3, twin_fraction=0.5)
    monkeypatch.setattr(dataset, "more_negatives", lambda *a, **k: ())
    without = generate_split("train", 12, seed=3, twin_fraction=0.5)
    assert all(s.more_negatives for s in with_more) and not any(any(s.more_negatives) for s in without)
    assert [replace(s, more_negatives=()) for s in with_more] == [replace(s, more_negatives=()) for s in without]


def test_negatives_are_mostly_binding_swaps_or_relation_flips():
    kinds = [k for s in split("test") for k in s.negative_kinds]
    share = sum(k in SWAP_KINDS or k == "relation_flip" for k in kinds) / len(kinds)
    assert share > 0.85


def test_same_seed_same_samples_and_pixels():
    a, b = generate_split("test", 20, seed=5), generate_split("test", 20, seed=5)
    assert a == b
    for x, y in zip(a[:5], b[:5]):
        assert np.array_equal(np.asarray(x.render()), np.asarray(y.render()))
    other = generate_split("test", 20, seed=6)
    assert [s.captions for s in a] != [s.captions for s in other]


def test_slice_equals_slice_of_whole_split():
    whole = generate_split("test", 9, seed=3)
    assert generate_split("test", 9, seed=3, start=3, stop=9) == whole[3:]


def test_same_scene_renders_differently_with_other_seed():
    a = np.asarray(render_scene(SCENE, 64, seed=1))
    b = np.asarray(render_scene(SCENE, 64, seed=2))
    assert a.shape == (64, 64, 3) and not np.array_equal(a, b)
    assert render_scene(SCENE, 96, seed=1).size == (96, 96)


def test_held_out_pairs_only_in_test():
    for name in ("train", "val"):
        for s in split(name):
            assert not s.held_out
            assert not {o.combo for o in s.scene.objects} & HELD_OUT
            for text in s.captions + s.hard_negatives:
                assert not {(m.colour, m.shape) for m in parse_caption(text).mentions} & HELD_OUT, text
    test = split("test")
    assert all(s.held_out == any(o.combo in HELD_OUT for o in s.scene.objects) for s in test)
    assert 0.2 < sum(s.held_out for s in test) / len(test) < 0.7


def test_most_scenes_have_two_objects():
    counts = [len(s.scene.objects) for s in split("train")]
    assert counts.count(2) / len(counts) >= 0.75
    assert set(counts) == {1, 2, 3}


def test_scene_objects_have_distinct_colours_shapes_and_cells():
    for s in split("train") + split("test"):
        objs = s.scene.objects
        for key in (lambda o: o.colour, lambda o: o.shape, lambda o: (o.row, o.col)):
            assert len({key(o) for o in objs}) == len(objs)


def test_test_split_has_confusable_twins():
    test = split("test")
    by_id = {s.image_id: s for s in test}
    twins = [s for s in test if s.twin_id is not None]
    assert 0.35 < len(twins) / len(test) < 0.65
    assert {s.twin_kind for s in twins} == {"colour_swap", "position_swap"}
    for s in twins:
        other = by_id[s.twin_id]
        assert other.twin_id == s.image_id and other.scene != s.scene
        bag = sorted((o.colour, o.shape, o.size) for o in s.scene.objects)
        if s.twin_kind == "position_swap":   # same objects, elsewhere
            assert bag == sorted((o.colour, o.shape, o.size) for o in other.scene.objects)
        else:                                 # same words, other bindings
            assert sorted(words(" ".join(f"{c} {sh}" for c, sh, _ in bag))) == sorted(
                words(" ".join(f"{o.colour} {o.shape}" for o in other.scene.objects)))
        # Every caption of a twin is false of the other, though its words fit both.
        assert not any(caption_matches(other.scene, parse_caption(c)) for c in s.captions)
    assert all(s.twin_id is None for s in split("train"))


def test_render_speed():
    scenes = [s.scene for s in split("train")[:200]]
    t = time.perf_counter()
    for i, scene in enumerate(scenes):
        render_scene(scene, 64, seed=i)
    assert time.perf_counter() - t < 2.0


def test_prepare_writes_karpathy_layout(tmp_path, capsys):
    prepare_main(["--out", str(tmp_path), "--train", "6", "--val", "2", "--test", "4",
                  "--seed", "1", "--workers", "1"])
    assert "wrote 12 images" in capsys.readouterr().out
    data = json.loads((tmp_path / "dataset_karpathy.json").read_text())
    images = data["images"]
    assert [im["split"] for im in images] == ["train"] * 6 + ["val"] * 2 + ["test"] * 4
    sentids = []
    for im in images:
        assert {"filepath", "filename", "split", "sentences", "imgid", "held_out"} <= im.keys()
        path = tmp_path / im["filepath"] / im["filename"]
        assert Image.open(path).size == (64, 64)
        for sent in im["sentences"]:
            assert sent["tokens"] == re.findall(r"[a-z]+", sent["raw"]) and sent["imgid"] == im["imgid"]
            sentids.append(sent["sentid"])
    assert sentids == list(range(60))
    caps = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert len(caps) == 60 and all((tmp_path / c["image"]).is_file() for c in caps)
    negs = [json.loads(line) for line in (tmp_path / "hard_negatives.jsonl").read_text().splitlines()]
    assert len(negs) == 20 and all(n["image"].startswith("images/test/") for n in negs)
    assert {"image", "caption", "negative", "held_out"} <= negs[0].keys()


def test_prepare_is_the_same_with_workers(tmp_path):
    counts = {"train": 4, "val": 0, "test": 6}
    prepare(tmp_path / "one", counts, 2, workers=1)
    prepare(tmp_path / "two", counts, 2, workers=2)
    for name in ("captions.jsonl", "hard_negatives.jsonl", "dataset_karpathy.json"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()


def test_bundled_samples_match_their_recipe():
    from itm.data.samples.make_samples import N_IMAGES, SEED
    from itm.data.synth.prepare import _corpus_caption

    samples = generate_split("test", N_IMAGES, SEED)
    lines = (SAMPLES / "captions.txt").read_text().splitlines()
    assert lines == [_corpus_caption(s) for s in samples]
    for s in samples[:: N_IMAGES // 10]:
        committed = np.asarray(Image.open(SAMPLES / "images" / f"{s.image_id}.png").convert("RGB"))
        assert np.array_equal(committed, np.asarray(s.render()))
    size = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert size < 2_000_000


def test_train_twins_are_confusable_and_keep_held_out_pairs_out():
    samples = generate_split("train", 200, seed=11, twin_fraction=0.5)
    by_id = {s.image_id: s for s in samples}
    twins = [s for s in samples if s.twin_id is not None]
    assert 0.3 < len(twins) / len(samples) < 0.6
    for s in twins:
        other = by_id[s.twin_id]
        assert other.twin_id == s.image_id and other.scene != s.scene
        assert not any(caption_matches(other.scene, parse_caption(c)) for c in s.captions)
    for s in samples:
        assert not s.held_out
        assert not {(m.colour, m.shape) for t in s.captions + s.hard_negatives
                    for m in parse_caption(t).mentions} & HELD_OUT
    assert tuple(generate_split("train", 200, seed=11)) == split("train")  # no twins asked: as it was
    with pytest.raises(ValueError, match="test split"):
        generate_split("test", 4, seed=11, twin_fraction=0.5)


def test_twins_in_training_leave_the_test_split_unchanged(tmp_path):
    counts = {"train": 8, "val": 2, "test": 6}
    prepare(tmp_path / "plain", counts, 4)
    prepare(tmp_path / "twins", counts, 4, twin_fraction=1.0)
    images = {name: json.loads((tmp_path / name / "dataset_karpathy.json").read_text())["images"]
              for name in ("plain", "twins")}
    test = {name: [im for im in ims if im["split"] == "test"] for name, ims in images.items()}
    assert test["plain"] == test["twins"]
    for im in test["plain"]:
        path = Path("images/test") / im["filename"]
        assert (tmp_path / "plain" / path).read_bytes() == (tmp_path / "twins" / path).read_bytes()
    assert any(im["twin"] for im in images["twins"] if im["split"] == "train")
    assert not any(im["twin"] for im in images["plain"] if im["split"] == "train")


def test_karpathy_scenes_round_trip_and_truth_table_matches_the_checker(tmp_path):
    from itm.data.synth.captions import truth_table
    from itm.data.synth.prepare import scene_from_dict

    prepare(tmp_path, {"test": 40}, 7)
    images = json.loads((tmp_path / "dataset_karpathy.json").read_text())["images"]
    samples = generate_split("test", 40, 7)
    scenes = [scene_from_dict(im["scene"]) for im in images]
    assert scenes == [s.scene for s in samples]
    texts = [c for s in samples for c in s.captions + s.hard_negatives]
    table = truth_table(texts, scenes)
    expected = [[caption_matches(sc, parse_caption(t)) for sc in scenes] for t in texts]
    assert table.tolist() == expected
    assert table.sum() > len(samples) * 5  # every caption is true of its own image, some of others too


def test_grounded_phrases_name_their_objects_and_cells(tmp_path):
    """Each phrase of a written caption spans one mention, and its box is the named object's cell."""
    from itm.data.synth.prepare import scene_from_dict
    from itm.training.data import load_dataset

    prepare(tmp_path, {"train": 30}, 3)
    images = json.loads((tmp_path / "dataset_karpathy.json").read_text())["images"]
    data = load_dataset(tmp_path / "dataset_karpathy.json")
    assert len(data) == 30
    for im, item in zip(images, data):
        scene = scene_from_dict(im["scene"])
        for caption, phrases in zip(item.captions, item.phrases):
            assert len(phrases) == len(parse_caption(caption).mentions)
            for ph in phrases:
                words = caption[ph.start:ph.end].split()
                (obj,) = [o for o in scene.objects if o.colour in words and o.shape == words[-1]]
                assert ph.box == (obj.col / 3, obj.row / 3, (obj.col + 1) / 3, (obj.row + 1) / 3)


def test_the_demo_encoders_see_attribute_negatives_only(tmp_path):
    """The recipe's encoder stage drops relation and position flips and position-swapped twins, nothing else;
    the flips become token negatives (kept apart in the text tokens only)."""
    from itm.training.data import load_dataset
    from itm.training.recipes.demo import RELATIONAL, attribute_negatives

    prepare(tmp_path, {"train": 80}, 5, twin_fraction=1.0)
    dataset = tmp_path / "dataset_karpathy.json"
    images = json.loads(dataset.read_text())["images"]
    data = load_dataset(dataset)
    kept = attribute_negatives(data, dataset)
    kinds = {s["raw"]: s["negative_kind"] for im in images for s in im["sentences"]}
    twin_kind = {im["filename"]: im["twin_kind"] for im in images}
    assert {k for k in kinds.values() if k in RELATIONAL} and {k for k in twin_kind.values()} >= {"position_swap"}
    for before, after in zip(data, kept):
        for caption, neg, new, token in zip(before.captions, before.negatives, after.negatives,
                                            after.token_negatives, strict=True):
            relational = kinds[caption] in RELATIONAL
            assert (new, token) == ((None, neg) if relational else (neg, None))
        moved = twin_kind[before.image.name] == "position_swap"
        assert after.hard_images == (() if moved else before.hard_images) and after.captions == before.captions


def test_the_recipe_takes_reranker_options_for_experiments():
    """--reranker-option (and --encoder-option) KEY=VALUE reads each value as its field's type and refuses
    what is not a field."""
    from itm.training.recipes.demo import STAGE2, STAGE3, with_options

    o = with_options(STAGE3, ["random_negatives=0", "lr=3e-4", "precision=fp32", "hard_images=false",
                              "stop_after=3000"])
    assert (o.random_negatives, o.lr, o.precision, o.hard_images, o.stop_after) == (0, 3e-4, "fp32", False, 3000)
    assert o.neighbours == STAGE3.neighbours and with_options(STAGE2, ["stop_after=none"]).stop_after is None
    for bad, why in (("nokey=1", "TrainOptions field"), ("lr", "KEY=VALUE"), ("lr=fast", "is a float"),
                     ("hard_images=yes", "true or false")):
        with pytest.raises(ValueError, match=why):
            with_options(STAGE2, [bad])


def test_the_recipe_refuses_encoders_that_make_relation_words_alike(tmp_path):
    """The bundled encoder keeps a caption and its relation flip apart where the reranker reads them; the same
    encoder with every relation word's embedding made one (so "left of" and "right of" read alike) is refused."""
    import torch

    from itm.common.errors import ItmError
    from itm.models.encoder import DualEncoder
    from itm.models.registry import resolve_model
    from itm.training.recipes.demo import RELATION_SPLIT, check_relation_words

    prepare(tmp_path / "synth", {"val": 40}, 3)
    dataset = tmp_path / "synth" / "dataset_karpathy.json"
    bundled = Path(__file__).resolve().parents[2] / "data" / "demo" / "encoder.safetensors"
    assert check_relation_words(bundled, dataset) > RELATION_SPLIT

    enc = DualEncoder.load(resolve_model("itm-demo", checkpoint=bundled))
    words = ("left", "right", "above", "below", "over", "under", "higher", "lower")
    ids = enc.tokenizer(list(words))
    assert bool((ids[:, 2] == ids[0, 2]).all())  # each word is one token, followed by the same end token
    table = enc.model.token_embedding.weight
    with torch.no_grad():
        table[ids[:, 1]] = table[ids[0, 1]].clone()
    (tmp_path / "alike").mkdir()
    alike = enc.save(tmp_path / "alike" / "encoder.safetensors")
    with pytest.raises(ItmError, match="relation flips alike"):
        check_relation_words(alike, dataset)
    flat = tmp_path / "flat.json"  # nothing to measure on is said, not passed
    flat.write_text(json.dumps({"images": [{"split": "val", "sentences": [
        {"raw": "a red circle", "negative": "a blue circle", "negative_kind": "colour_change"}]}]}))
    with pytest.raises(ItmError, match="no val caption has a relation flip"):
        check_relation_words(bundled, flat)
