"""Photo-like world: vocabulary, truth of captions, falsity of negatives, relations, held-out pairs, twins, files."""
from __future__ import annotations

import ast
import doctest
import importlib
import json
import re
import time
from collections import Counter
from dataclasses import replace
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from itm.data.scenes import (
    CATEGORIES,
    COLOURED,
    HELD_OUT,
    NEGATIVE_KINDS,
    PLACES,
    TEMPLATES,
    TWIN_KINDS,
    CaptionParts,
    Mention,
    Scene,
    Thing,
    Wording,
    caption_kind,
    caption_matches,
    generate_split,
    holds,
    parse_caption,
    relations,
    render_caption,
    render_scene,
    sample_scene,
    uses,
    why_false,
    wordings,
)
from itm.data.scenes.prepare import main as prepare_main

PACKAGE = Path(importlib.import_module("itm.data.scenes").__file__).parent
MODULES = ("__init__", "world", "layout", "captions", "describe", "dataset", "render", "prepare", "glyphs.__init__",
           "glyphs.extract")


@cache
def split(name: str, n: int = 120, seed: int = 3) -> tuple:
    return tuple(generate_split(name, n, seed))


def thing(category: str, box: tuple[float, float, float, float], z: int = 0, colour: str | None = None) -> Thing:
    cat = CATEGORIES[category]
    look = cat.tinted[0][0] if colour else cat.looks[0]
    return Thing(category, look, colour, box, z)


def template_of(text: str) -> str:
    """The held-out templates, as the text shows them."""
    words = re.findall(r"[a-z]+", text)
    if text.startswith("a photo of"):
        return "photo"
    return "with_it" if "it" in words or "them" in words else "other"


# ---------------------------------------------------------------- vocabulary and package

def test_vocabulary_is_wide_enough():
    assert len(CATEGORIES) >= 40 and len(PLACES) >= 8
    for name in ("dog", "cat", "person", "car", "bus", "pizza", "chair", "tree", "house", "ball", "umbrella"):
        assert name in CATEGORIES
    assert {"car", "ball", "balloon", "umbrella", "shirt", "cup"} <= set(COLOURED)
    assert all(CATEGORIES[c].colours and CATEGORIES[c].tinted for c in COLOURED)
    for cat in CATEGORIES.values():
        assert cat.places and set(cat.places) <= {p.code for p in PLACES.values()}, cat.name
    assert len(CATEGORIES["dog"].looks) >= 3 and len(CATEGORIES["person"].looks) >= 3


def test_glyphs_are_package_data_within_budget():
    folder = resources.files("itm.data.scenes") / "glyphs"
    codes = {code for c in CATEGORIES.values() for code in c.all_looks}
    pngs = {p.name[:-4]: p for p in folder.iterdir() if p.name.endswith(".png")}
    assert codes == set(pngs)
    assert sum(len(p.read_bytes()) for p in pngs.values()) < 1.5e6
    licence = (folder / "LICENSE-NOTO.txt").read_text()
    assert "Apache License" in licence and "SIL Open Font License" in licence


def test_package_imports_only_itself_numpy_and_pillow():
    allowed = {"__future__", "argparse", "collections", "dataclasses", "functools", "importlib", "json",
               "multiprocessing", "pathlib", "re", "time", "typing", "numpy", "PIL"}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in allowed, (path, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in allowed for a in node.names), path


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    name = "itm.data.scenes" + ("" if module == "__init__" else "." + module.replace(".__init__", ""))
    assert doctest.testmod(importlib.import_module(name)).failed == 0


# ---------------------------------------------------------------- captions

def test_generated_captions_are_true_and_negatives_false():
    kinds = Counter()
    for name in ("train", "val", "test"):
        for s in split(name):
            assert len(s.captions) == 5 and len(s.hard_negatives) == 5
            for c in s.captions:
                assert caption_matches(s.scene, parse_caption(c)), (s.image_id, c)
            for neg, kind, more in zip(s.hard_negatives, s.negative_kinds, s.more_negatives):
                assert kind in NEGATIVE_KINDS
                assert neg not in more and neg not in s.captions
                for text in (neg, *more):
                    assert not caption_matches(s.scene, parse_caption(text)), (s.image_id, text)
                kinds[kind] += 1
    assert set(kinds) == set(NEGATIVE_KINDS), kinds


def test_every_wording_reads_back_to_the_same_meaning():
    meanings = {parse_caption(c) for s in split("test") for c in s.captions}
    meanings |= {CaptionParts((Mention("dog", 2), Mention("car", 1, "red")), "left", "beach"),
                 CaptionParts((Mention("ice cream", 3),), None, "night"),
                 CaptionParts((Mention("teddy bear", 1), Mention("potted plant", 4)), "in_front", "room")}
    for parts in meanings:
        texts = set()
        for w in wordings(parts):
            text = render_caption(parts, w)
            assert parse_caption(text) == parts, (text, parts)
            texts.add(text)
        assert len(texts) == len(wordings(parts))   # every wording says it differently
    assert len({w.template for p in meanings for w in wordings(p)}) == len(TEMPLATES)


@pytest.mark.parametrize("text, wording", [
    ("a dog on a beach", Wording("plain")),
    ("a dog on the beach", Wording("plain", place=1)),
    ("a beach with a dog", Wording("place_first")),
])
def test_wordings_of_a_dog_on_a_beach(text, wording):
    parts = CaptionParts((Mention("dog"),), None, "beach")
    assert render_caption(parts, wording) == text and parse_caption(text) == parts


def test_relation_wordings_name_the_same_meaning():
    parts = CaptionParts((Mention("dog", 2), Mention("car", 1, "red")), "left")
    for text in ("two dogs to the left of a red car", "two dogs left of a red car",
                 "a red car with two dogs left of it", "there are two dogs on the left of a red car",
                 "two dogs are to the left of a red car"):
        assert parse_caption(text) == parts, text
    assert parse_caption("a dog beside a cat") == parse_caption("a dog next to a cat")
    assert parse_caption("a cat under the night sky") == CaptionParts((Mention("cat"),), None, "night")


# A dog (left), a car (right), a bird high over the dog; three cats in a row.
DOG = thing("dog", (0.1, 0.6, 0.3, 0.85), 1)
CAR = thing("car", (0.6, 0.55, 0.9, 0.8), 0, "red")
BIRD = thing("bird", (0.12, 0.05, 0.26, 0.2), 0)


def test_counts_are_exact():
    cats = Scene("room", tuple(thing("cat", (x, 0.6, x + 0.15, 0.8), k) for k, x in enumerate((0.05, 0.4, 0.75))))
    assert caption_matches(cats, parse_caption("three cats in a room"))
    for text in ("a cat", "two cats", "four cats", "three cats on a beach"):
        assert not caption_matches(cats, parse_caption(text)), text
    balls = Scene("field", (thing("ball", (0.1, 0.8, 0.2, 0.9), 0, "red"),
                            thing("ball", (0.6, 0.8, 0.7, 0.9), 1, "blue")))
    assert caption_matches(balls, parse_caption("two balls"))
    assert caption_matches(balls, parse_caption("a red ball to the left of a blue ball"))
    for text in ("a ball", "two red balls", "a blue ball left of a red ball", "a green ball"):
        assert not caption_matches(balls, parse_caption(text)), text


@pytest.mark.parametrize("a, b, expected", [
    (DOG, CAR, {"left"}),
    (CAR, DOG, {"right"}),
    (BIRD, DOG, {"above"}),
    (DOG, BIRD, {"below"}),
    # centres too close across for left or right
    (thing("dog", (0.3, 0.6, 0.5, 0.85)), thing("cat", (0.42, 0.1, 0.56, 0.3)), {"below"}),
    # side by side, a small gap: next to, and left of
    (thing("dog", (0.1, 0.6, 0.3, 0.85)), thing("cat", (0.33, 0.62, 0.5, 0.84)), {"left", "next_to"}),
    # a gap wider than half the narrower: not next to
    (thing("dog", (0.1, 0.6, 0.3, 0.85)), thing("cat", (0.45, 0.62, 0.62, 0.84)), {"left"}),
    # overlapping, nearer: in front
    (thing("dog", (0.35, 0.62, 0.55, 0.92), 1), thing("car", (0.4, 0.5, 0.8, 0.8), 0, "red"), {"in_front"}),
    (thing("car", (0.4, 0.5, 0.8, 0.8), 0, "red"), thing("dog", (0.35, 0.62, 0.55, 0.92), 1), {"behind"}),
    # far to the side and a little higher: left, not above
    (thing("bird", (0.05, 0.3, 0.15, 0.4)), thing("dog", (0.7, 0.45, 0.9, 0.7)), {"left"}),
])
def test_relation_geometry(a, b, expected):
    assert set(relations(a, b)) == expected


def test_relations_of_groups_hold_for_every_pair():
    dogs = (thing("dog", (0.02, 0.6, 0.2, 0.8), 0), thing("dog", (0.22, 0.62, 0.4, 0.82), 1))
    scene = Scene("beach", (*dogs, CAR))
    assert caption_matches(scene, parse_caption("two dogs left of a red car on a beach"))
    assert caption_matches(scene, parse_caption("a red car with two dogs to the left of it"))
    assert not caption_matches(scene, parse_caption("two dogs right of a red car"))
    moved = Scene("beach", (dogs[0], replace(dogs[1], box=(0.75, 0.82, 0.93, 0.99)), CAR))
    assert not caption_matches(moved, parse_caption("two dogs left of a red car"))
    assert not holds("left", moved.things[1], CAR)


@pytest.mark.parametrize("text, kind, why", [
    ("a dog on a beach", "place", None),
    ("two dogs", "count", "count"),
    ("a red car", "colour", None),
    ("a blue car", "colour", "colour"),
    ("a dog left of a car", "relation", None),
    ("a dog right of a car", "relation", "relation"),
    ("a cat", "plain", "category"),
    ("a dog in the snow", "place", "place"),
    ("two dogs left of a blue car at the beach", "several", "several"),
])
def test_kinds_and_why_false(text, kind, why):
    scene = Scene("beach", (DOG, CAR, BIRD))
    assert caption_kind(parse_caption(text)) == kind
    assert why_false(scene, parse_caption(text)) == why


def test_binding_swap_is_found_false():
    scene = Scene("field", (thing("ball", (0.1, 0.8, 0.2, 0.9), 0, "red"),
                            thing("car", (0.5, 0.6, 0.8, 0.85), 1, "blue")))
    assert caption_matches(scene, parse_caption("a red ball and a blue car"))
    assert why_false(scene, parse_caption("a blue ball and a red car")) == "binding"


# ---------------------------------------------------------------- splits

def test_splits_are_deterministic():
    a, b = generate_split("test", 6, seed=7), generate_split("test", 6, seed=7)
    assert a == b
    assert np.array_equal(np.asarray(a[3].render()), np.asarray(b[3].render()))
    assert generate_split("test", 6, seed=7, start=2, stop=5) == a[2:5]
    assert generate_split("test", 6, seed=8) != a


def test_layouts_keep_their_rules():
    rng = np.random.default_rng(0)
    for _ in range(150):
        scene = sample_scene(rng)
        assert 1 <= len(scene.things) <= 6 and scene.place in PLACES
        for t in scene.things:
            assert scene.place in [p.name for p in PLACES.values() if p.code in CATEGORIES[t.category].places]
            assert 0 <= t.box[0] < t.box[2] <= 1 and 0 <= t.box[1] < t.box[3] <= 1
            assert abs(t.angle) <= 15 and (t.colour is not None) == (t.look in dict(CATEGORIES[t.category].tinted))
        assert sorted(t.z for t in scene.things) == list(range(len(scene.things)))


def _pairs_in(samples) -> tuple[set, set, set]:
    colours = {(t.category, t.colour) for s in samples for t in s.scene.things}
    places = {(t.category, s.scene.place) for s in samples for t in s.scene.things}
    texts = [c for s in samples for c in (*s.captions, *s.hard_negatives, *(m for ms in s.more_negatives for m in ms))]
    return colours, places, set(texts)


def test_held_out_pairs_only_in_their_split():
    for name in ("train", "val", "test"):
        colours, places, texts = _pairs_in(split(name))
        for other in {"val", "test"} - {name}:
            held = HELD_OUT[other]
            assert not colours & held.colours and not places & held.places, (name, other)
            assert not any(uses(parse_caption(t), held) for t in texts), (name, other)
            assert not {template_of(t) for t in texts} & held.wordings, (name, other)
        if name in HELD_OUT:   # present where they belong, in images and in captions
            held = HELD_OUT[name]
            assert len(colours & held.colours) >= 4 and len(places & held.places) >= 4, name
            assert any(uses(parse_caption(c), held) for s in split(name) for c in s.captions)
            assert held.wordings <= {template_of(c) for s in split(name) for c in s.captions}
            assert sum(s.held_out for s in split(name)) >= len(split(name)) // 5


def test_held_out_sets_are_sound():
    assert not HELD_OUT["val"].colours & HELD_OUT["test"].colours
    assert not HELD_OUT["val"].places & HELD_OUT["test"].places
    for held in HELD_OUT.values():
        assert held.wordings <= set(TEMPLATES)
        assert all(colour in CATEGORIES[c].colours for c, colour in held.colours)
        assert all(PLACES[p].code in CATEGORIES[c].places for c, p in held.places)


def _differ_by_one(a: Scene, b: Scene, kind: str) -> bool:
    if a.place != b.place:
        return False
    strip = lambda t: replace(t, z=0)
    if kind == "count_change":
        ca, cb = Counter(map(strip, a.things)), Counter(map(strip, b.things))
        return sum(((ca - cb) + (cb - ca)).values()) == 1
    moved = [(s, t) for s, t in zip(a.things, b.things) if strip(s) != strip(t)]
    same = [(s.category, s.look, s.colour, s.angle, s.flip) == (t.category, t.look, t.colour, t.angle, t.flip)
            for s, t in moved]
    return len(moved) == 2 and all(same)


def test_twins_differ_in_one_thing_and_captions_tell_them_apart():
    samples = {s.image_id: s for s in split("test")}
    kinds = Counter()
    for s in samples.values():
        if s.twin_id is None:
            continue
        twin = samples[s.twin_id]
        assert twin.twin_id == s.image_id and twin.twin_kind == s.twin_kind in TWIN_KINDS
        assert _differ_by_one(s.scene, twin.scene, s.twin_kind), s.image_id
        for c in s.captions:
            parts = parse_caption(c)
            assert caption_matches(s.scene, parts) and not caption_matches(twin.scene, parts), (s.image_id, c)
        kinds[s.twin_kind] += 1
    assert set(kinds) == set(TWIN_KINDS) and sum(kinds.values()) >= len(samples) // 4


def test_train_twins_when_asked():
    samples = generate_split("train", 8, seed=1, twin_fraction=1.0)
    assert all(s.twin_id is not None for s in samples)
    assert all(s.twin_id is None for s in generate_split("train", 8, seed=1))


# ---------------------------------------------------------------- rendering and files

def test_render_size_mode_and_speed():
    s = split("test")[0]
    image = s.render()
    assert image.size == (160, 160) and image.mode == "RGB"
    assert render_scene(s.scene, 128, 1).size == (128, 128)
    scenes = [x.scene for x in split("train")[:20]]
    t0 = time.perf_counter()
    for k, scene in enumerate(scenes):
        render_scene(scene, 160, k)
    assert (time.perf_counter() - t0) / len(scenes) < 0.1   # about 6 ms here; generous for shared machines


def test_places_look_different():
    means = {p: np.asarray(render_scene(Scene(p, ()), 64, 0), dtype=float).reshape(-1, 3).mean(0) for p in PLACES}
    for p in PLACES:
        for q in PLACES:
            assert p == q or np.abs(means[p] - means[q]).max() > 6, (p, q)


def test_prepare_writes_images_karpathy_json_and_corpus(tmp_path, capsys):
    prepare_main([str(tmp_path), "--train", "4", "--val", "2", "--test", "4", "--seed", "3", "--size", "128",
                  "--workers", "1"])
    assert "wrote 10 images" in capsys.readouterr().out
    data = json.loads((tmp_path / "dataset_karpathy.json").read_text())
    images = data["images"]
    assert [im["split"] for im in images] == ["train"] * 4 + ["val"] * 2 + ["test"] * 4
    for im in images:
        assert (tmp_path / im["filepath"] / im["filename"]).is_file()
        for sent in im["sentences"]:
            assert sent["negative"] and sent["negative_kind"] in NEGATIVE_KINDS
            for p in sent["phrases"]:
                start, end = p["span"]
                assert sent["raw"][start:end] and all(0 <= v <= 1 for v in p["box"])
    names = {im["filename"] for im in images}
    assert [im["twin_kind"] for im in images if im["split"] == "test"] == ["count_change"] * 2 + ["position_swap"] * 2
    assert all(im["twin"] in names for im in images if im["twin"])
    assert len((tmp_path / "captions.txt").read_text().splitlines()) == 10
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(len(r["captions"]) == len(r["hard_negatives"]) == 5 for r in rows)
