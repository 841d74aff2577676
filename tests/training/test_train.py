import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from itm.common.errors import ItmError
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.training import grounding as grounding_mod
from itm.training import train as train_mod
from itm.training.data import load_dataset
from itm.training.loss import ItmLoss
from itm.training.options import TrainOptions
from itm.training.train import train
from tests.conftest import write_images

OPTS = dict(fusion="fusion-tiny", batch_size=4, max_steps=4, epochs=10, save_every=1, workers=0)


@pytest.mark.parametrize("train_encoders", [False, True])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, caption_file, tiny_spec, monkeypatch,
                                                          train_encoders):
    data = load_dataset(caption_file)
    assert len(data) == 12 and all(len(d.captions) == 2 for d in data)
    opts = TrainOptions(**OPTS, train_encoders=train_encoders, encoder_lr=1e-3)
    straight = train(tiny_spec, data, tmp_path / "a", opts)
    assert straight.steps == 4 and set(straight.losses) == {"contrastive", "matching", "ranking", "total"}

    resumed = interrupted_and_resumed(tiny_spec, data, tmp_path / "b", opts, monkeypatch)
    assert resumed.steps == 4
    pairs = [(straight.reranker, resumed.reranker)]
    if train_encoders:
        pairs.append((straight.encoder, resumed.encoder))
    for x, y in pairs:
        a, b = load_file(str(x)), load_file(str(y))
        assert all(torch.equal(a[k], b[k]) for k in a)


def interrupted_and_resumed(spec, data, out, opts, monkeypatch):
    """A run killed at its third step, then resumed from its checkpoints to the end."""
    real_step, calls = train_mod._step, []

    def crash_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(train_mod, "_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train(spec, data, out, opts)
    monkeypatch.setattr(train_mod, "_step", real_step)
    return train(spec, data, out, opts, resume=True)


def test_encoder_training_writes_a_loadable_checkpoint(tmp_path, caption_file, tiny_spec):
    from itm.models.encoder import DualEncoder
    from itm.models.registry import resolve_model
    r = train(tiny_spec, load_dataset(caption_file), tmp_path / "enc",
              TrainOptions(**{**OPTS, "max_steps": 2}, train_encoders=True, train_reranker=False, encoder_lr=1e-3))
    assert r.reranker is None and set(r.losses) == {"contrastive", "total"}
    trained = DualEncoder.load(resolve_model("itm-tiny", checkpoint=r.encoder))
    before = DualEncoder.load(tiny_spec)
    x = torch.randn(1, 3, 32, 32)
    assert not torch.equal(trained.encode_images(x).embeddings, before.encode_images(x).embeddings)


def test_token_margin_keeps_token_negatives_apart_in_the_text_tower(tmp_path, caption_file, tiny_spec):
    """Encoder training with token_margin pushes each caption's tokens, at the fusion config's text layers,
    away from its token negative's; without it the same seeded run leaves them closer."""
    from dataclasses import replace

    from itm.models.encoder import DualEncoder
    from itm.models.registry import resolve_model
    from itm.training.loss import token_distances

    flip = {"red": "blue", "blue": "red"}
    data = [replace(d, token_negatives=tuple(c.rsplit(" ", 1)[0] + " " + flip[c.rsplit(" ", 1)[1]]
                                             for c in d.captions)) for d in load_dataset(caption_file)]
    pairs = [(c, n) for d in data for c, n in zip(d.captions, d.token_negatives)]
    layers = get_fusion_config("fusion-tiny").text_layers

    def distance(spec) -> float:
        enc = DualEncoder.load(spec)
        e = enc.encode_texts([a for a, _ in pairs] + [b for _, b in pairs], layers)
        n = len(pairs)
        return float(token_distances([t[:n] for t in e.tokens], [t[n:] for t in e.tokens],
                                     e.mask[:n] & e.mask[n:]).mean())

    opts = TrainOptions(**{**OPTS, "max_steps": 12}, train_encoders=True, train_reranker=False, encoder_lr=3e-3)
    plain = train(tiny_spec, data, tmp_path / "plain", opts)
    apart = train(tiny_spec, data, tmp_path / "apart", replace(opts, token_margin=1.5))
    assert "separation" in apart.losses and "separation" not in plain.losses
    before = distance(tiny_spec)
    after = {r.out_dir.name: distance(resolve_model("itm-tiny", checkpoint=r.encoder)) for r in (plain, apart)}
    assert after["apart"] > before and after["apart"] > after["plain"] + 0.05, (before, after)


@pytest.fixture
def grounded_blocks(tmp_path):
    """8 images with a red or a blue block in one quarter, each captioned once and grounded in that quarter."""
    from PIL import Image
    images = []
    for i in range(8):
        colour, x0, y0 = ("red", "blue")[i % 2], 16 * (i // 2 % 2), 16 * (i // 4)
        image = Image.new("RGB", (32, 32), "white")
        image.paste(colour, (x0, y0, x0 + 16, y0 + 16))
        image.save(tmp_path / f"b{i}.png")
        phrase = f"a {colour} block"
        images.append({"filepath": ".", "filename": f"b{i}.png", "split": "train", "sentences": [
            {"raw": f"{phrase} on white, picture {i}",
             "phrases": [{"span": [0, len(phrase)], "box": [x0 / 32, y0 / 32, (x0 + 16) / 32, (y0 + 16) / 32]}]}]})
    (tmp_path / "blocks.json").write_text(json.dumps({"images": images}))
    return load_dataset(tmp_path / "blocks.json")


def test_region_words_read_each_phrases_words_from_its_box(tmp_path, grounded_blocks, tiny_spec, monkeypatch):
    """The region-word loss gets each caption's phrase, its box's share of the image tokens and its words, and
    its gradient reaches the image tower (the encoder differs from the same seeded run without it)."""
    import open_clip
    seen = []
    real = train_mod.region_word_loss
    monkeypatch.setattr(train_mod, "region_word_loss", lambda t, h, p: seen.append((h, p)) or real(t, h, p))
    opts = TrainOptions(**{**OPTS, "max_steps": 3, "batch_size": 8}, train_encoders=True, train_reranker=False,
                        encoder_lr=1e-3)
    r = train(tiny_spec, grounded_blocks, tmp_path / "words", replace(opts, region_words=1.0))
    assert "words" in r.losses and r.losses["words"] > 0 and len(seen) == 3
    heads, phrases = seen[0]
    ids = open_clip.SimpleTokenizer().encode
    assert heads.vocabulary == tuple(sorted({*ids("a red block"), *ids("a blue block")}))
    assert heads.layers == tuple(get_fusion_config("fusion-tiny").image_layers)
    batch = []  # (colour, the top-left patch of its box) of each phrase, in the run's seeded batch order
    for n in range(8):
        words = {heads.vocabulary[v] for v in phrases.words[n].nonzero().flatten().tolist()}
        colour = next(c for c in ("red", "blue") if words == set(ids(f"a {c} block")))
        shares = phrases.shares[n]
        assert shares[0] == 0 and shares.max() == 0.25  # a quarter of a 4x4 patch grid: 4 patches
        batch.append((colour, int(shares[1:].argmax())))
    assert sorted(batch) == sorted((("red", "blue")[i % 2], 8 * (i // 4) + 2 * (i // 2 % 2)) for i in range(8))
    assert phrases.rows.tolist() == list(range(8))
    plain = train(tiny_spec, grounded_blocks, tmp_path / "plain", opts)
    a, b = load_file(str(r.encoder)), load_file(str(plain.encoder))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("visual."))


def test_region_word_heads_resume_with_their_run(tmp_path, grounded_blocks, tiny_spec, monkeypatch):
    opts = TrainOptions(**{**OPTS, "max_steps": 4, "batch_size": 4}, train_encoders=True, train_reranker=False,
                        encoder_lr=1e-3, region_words=1.0)
    straight = train(tiny_spec, grounded_blocks, tmp_path / "a", opts)
    resumed = interrupted_and_resumed(tiny_spec, grounded_blocks, tmp_path / "b", opts, monkeypatch)
    a, b = load_file(str(straight.encoder)), load_file(str(resumed.encoder))
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(tiny_spec, grounded_blocks, tmp_path / "c", replace(opts, region_words=0.0, max_steps=2))
    with pytest.raises(ItmError, match="without region-word heads"):
        train(tiny_spec, grounded_blocks, tmp_path / "c", opts, resume=True)
    with pytest.raises(ItmError, match="with region-word heads"):
        train(tiny_spec, grounded_blocks, tmp_path / "a", replace(opts, region_words=0.0, max_steps=6), resume=True)


def test_a_fine_tune_starts_from_the_given_reranker(tmp_path, caption_file, tiny_spec):
    data = load_dataset(caption_file)
    first = train(tiny_spec, data, tmp_path / "a", TrainOptions(**{**OPTS, "max_steps": 2}))
    start = load_file(str(first.reranker))
    # lr 0: the fine-tune's weights are exactly the ones it started from, not a fresh model's
    kept = train(tiny_spec, data, tmp_path / "b", TrainOptions(**{**OPTS, "max_steps": 1, "lr": 0.0},
                                                              init_reranker=first.reranker))
    assert all(torch.equal(start[k], v) for k, v in load_file(str(kept.reranker)).items())
    fresh = train(tiny_spec, data, tmp_path / "c", TrainOptions(**{**OPTS, "max_steps": 1, "lr": 0.0}))
    assert not all(torch.equal(start[k], v) for k, v in load_file(str(fresh.reranker)).items())
    tuned = train(tiny_spec, data, tmp_path / "d", TrainOptions(**{**OPTS, "max_steps": 2, "neighbours": 2},
                                                               init_reranker=first.reranker))
    assert tuned.steps == 2 and not all(torch.equal(start[k], v) for k, v in load_file(str(tuned.reranker)).items())
    assert json.loads((tmp_path / "d" / "train_state.json").read_text())["options"]["init_reranker"] == \
        str(first.reranker)


def test_augmented_batches_hold_degraded_copies_of_their_images(caption_file, tiny_encoder):
    data, encoder = load_dataset(caption_file), tiny_encoder
    paths = [d.image for d in data[:8]]
    cache = train_mod.ImageCache(encoder, workers=2, on_skip=None, variants=2)
    clean, keep = cache.get(paths)
    assert keep == list(range(8))
    none, _ = cache.get(paths, augment=0.0, seed=1)
    assert torch.equal(none, clean)
    mixed, _ = cache.get(paths, augment=0.5, seed=1)
    changed = [not torch.equal(a, b) for a, b in zip(mixed, clean)]
    assert 0 < sum(changed) < 8  # about half, drawn by the seed
    assert torch.equal(cache.get(paths, augment=0.5, seed=1)[0], mixed)  # the same draw, the same copies
    every, _ = cache.get(paths, augment=1.0, seed=2)
    assert all(not torch.equal(a, b) for a, b in zip(every, clean))
    sim = F.normalize(every.flatten(1), dim=1) @ F.normalize(clean.flatten(1), dim=1).T
    assert torch.equal(sim.argmax(1), torch.arange(8))  # degraded, each still closest to its own image
    assert len(cache.degraded) <= 2 * 8
    # a fresh cache makes the same copies: a resumed run sees what the interrupted one would have
    again = train_mod.ImageCache(encoder, workers=0, on_skip=None, variants=2)
    assert torch.equal(again.get(paths, augment=1.0, seed=2)[0], every)
    # past its cap a cache keeps no more images, files or copies, and makes the same copies anew
    small = train_mod.ImageCache(encoder, workers=0, on_skip=None, max_items=3, variants=2)
    for _ in range(2):
        assert torch.equal(small.get(paths, augment=1.0, seed=2)[0], every)
    assert max(len(small.cache), len(small.files), len(small.degraded)) == 3


def test_degraded_copies_do_not_depend_on_where_the_images_lie(caption_file, tiny_encoder, tmp_path):
    paths = [d.image for d in load_dataset(caption_file)[:4]]
    moved = []
    for i, p in enumerate(paths):  # the same files under other names, in another folder
        moved.append(tmp_path / "elsewhere" / f"copy{i}{p.suffix}")
        moved[-1].parent.mkdir(exist_ok=True)
        moved[-1].write_bytes(p.read_bytes())
    here = train_mod.ImageCache(tiny_encoder, workers=0, on_skip=None, variants=2)
    there = train_mod.ImageCache(tiny_encoder, workers=0, on_skip=None, variants=2)
    a, b = here.get(paths, augment=1.0, seed=3)[0], there.get(moved, augment=1.0, seed=3)[0]
    assert not torch.equal(a, here.get(paths)[0])  # degraded copies, not the clean images
    assert torch.equal(a, b)


def test_bf16_training_runs_the_reranker_in_bf16_and_keeps_fp32_weights(tmp_path, caption_file, tiny_spec,
                                                                         monkeypatch):
    data = load_dataset(caption_file)
    dtypes, make = {"store": set(), "fusion": set()}, train_mod._make_reranker
    def watched(*a, **k):  # the output dtypes of the reranker's linear layers, store projections apart
        reranker = make(*a, **k)
        for name, m in reranker.named_modules():
            if isinstance(m, torch.nn.Linear):
                seen = dtypes["store" if name.startswith("store.") else "fusion"]
                m.register_forward_hook(lambda mod, args, out, seen=seen: seen.add(out.dtype))
        return reranker
    monkeypatch.setattr(train_mod, "_make_reranker", watched)
    opts = {**OPTS, "max_steps": 2}
    fp32 = train(tiny_spec, data, tmp_path / "a", TrainOptions(**opts))
    assert dtypes == {"store": {torch.float32}, "fusion": {torch.float32}}
    dtypes = {"store": set(), "fusion": set()}
    bf16 = train(tiny_spec, data, tmp_path / "b", TrainOptions(**opts, precision="bf16"))
    # the store features stay fp32, as at query time; the fusion layers run in bf16
    assert dtypes == {"store": {torch.float32}, "fusion": {torch.bfloat16}}
    assert all(torch.isfinite(torch.tensor(v)) for v in bf16.losses.values())
    a, b = load_file(str(fp32.reranker)), load_file(str(bf16.reranker))
    assert all(v.dtype == torch.float32 for v in b.values())
    # the same seeded steps in another arithmetic: close to fp32's weights, not equal to them
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.allclose(a[k], b[k], atol=0.05) for k in a)


def test_bad_training_requests(tmp_path, caption_file, tiny_spec):
    data = load_dataset(caption_file)
    with pytest.raises(ItmError, match="nothing to train"):
        train(tiny_spec, data, tmp_path / "x", TrainOptions(train_reranker=False))
    with pytest.raises(ItmError, match="empty"):
        train(tiny_spec, [], tmp_path / "x", TrainOptions(**OPTS))
    with pytest.raises(ItmError, match="augment"):
        train(tiny_spec, data, tmp_path / "x", TrainOptions(**OPTS, augment=1.5))
    with pytest.raises(ItmError, match="precision is one of fp32, bf16"):
        train(tiny_spec, data, tmp_path / "x", TrainOptions(**OPTS, precision="fp16"))
    with pytest.raises(ItmError, match="encoders train in fp32"):
        train(tiny_spec, data, tmp_path / "x", TrainOptions(**OPTS, precision="bf16", train_encoders=True,
                                                            train_reranker=False))
    with pytest.raises(ItmError, match="reads layers"):
        train(tiny_spec, data, tmp_path / "x", TrainOptions(**{**OPTS, "fusion": "fusion-base"}))
    with pytest.raises(ItmError, match="token_margin .* needs the encoders to train"):
        train(tiny_spec, data, tmp_path / "x", TrainOptions(**OPTS, token_margin=0.2))
    with pytest.raises(ItmError, match="positive distance"):
        train(tiny_spec, data, tmp_path / "x", TrainOptions(**OPTS, token_margin=-0.2, train_encoders=True))
    with pytest.raises(ItmError, match="region_words .* needs the encoders to train"):
        train(tiny_spec, data, tmp_path / "x", TrainOptions(**OPTS, region_words=1.0))
    with pytest.raises(ItmError, match="positive weight"):
        train(tiny_spec, data, tmp_path / "x", TrainOptions(**OPTS, region_words=-1.0, train_encoders=True))
    with pytest.raises(ItmError, match="grounds none"):
        train(tiny_spec, data, tmp_path / "x", TrainOptions(**OPTS, region_words=1.0, train_encoders=True))
    wide = FusionReranker(get_fusion_config("fusion-tiny", image_width=8, text_width=8))
    from itm.models.fusion_checkpoint import save_reranker
    save_reranker(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ItmError, match="wide"):
        train(tiny_spec, data, tmp_path / "x", TrainOptions(**OPTS, init_reranker=tmp_path / "wide.safetensors"))


# ---- binding: a reranker told only bags of words by the dual side learns who has which colour ----

N_COLOURS, N_SHAPES, D = 5, 5, 32


def scene_features(colours, shapes, table):
    """Store features of 2-object scenes (left, right) and captions 'c0 s0 left-of c1 s1', as the store holds them."""
    b = len(colours)
    img = torch.zeros(b, 2, 5, D)  # (B, Lv, Ti, D): CLS + 2x2 regions; objects in regions 1 (left) and 2 (right)
    for side in (0, 1):
        obj = table["colour"][colours[:, side]] + table["shape"][shapes[:, side]] + table["pos"][side]
        img[:, :, 1 + side] = obj[:, None]
    words = [table["sot"].expand(b, D), table["colour"][colours[:, 0]], table["shape"][shapes[:, 0]],
             table["left_of"].expand(b, D), table["colour"][colours[:, 1]], table["shape"][shapes[:, 1]],
             table["eot"].expand(b, D), torch.zeros(b, D)]
    txt = torch.stack(words, 1)[:, None].expand(b, 2, 8, D).clone()  # (B, Lt, Tt, D)
    mask = torch.arange(8)[None].expand(b, 8) < 7
    bag = table["colour"][colours].sum(1) + table["shape"][shapes].sum(1)  # order-free: blind to bindings
    return img, txt, mask, F.normalize(bag, dim=-1)


def test_swapping_colours_between_objects_lowers_the_fused_score():
    g = torch.Generator().manual_seed(0)
    table = {k: torch.randn(n, D, generator=g) for k, n in (("colour", N_COLOURS), ("shape", N_SHAPES), ("pos", 2))}
    table |= {k: torch.randn(D, generator=g) for k in ("sot", "eot", "left_of")}
    torch.manual_seed(0)
    model = FusionReranker(get_fusion_config("fusion-tiny", image_width=D, text_width=D))
    loss_fn = ItmLoss(num_negatives=2)
    opt = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=2e-3)

    def draw(n):
        colours = torch.stack([torch.randperm(N_COLOURS, generator=g)[:2] for _ in range(n)])
        shapes = torch.stack([torch.randperm(N_SHAPES, generator=g)[:2] for _ in range(n)])
        return colours, shapes

    for _ in range(300):
        colours, shapes = draw(16)
        twins = colours.flip(1)  # each scene beside its colour-swapped twin, as confusable as can be
        img, txt, mask, bag = scene_features(torch.cat([colours, twins]), torch.cat([shapes, shapes]), table)
        parts = loss_fn(model, img, txt, mask, bag, bag)
        opt.zero_grad()
        parts["total"].backward()
        opt.step()

    model.eval()
    colours, shapes = draw(200)
    img, txt, mask, bag = scene_features(colours, shapes, table)
    _, swapped, swapped_mask, swapped_bag = scene_features(colours.flip(1), shapes, table)
    with torch.no_grad():
        true = model.score(model(img, txt, mask), (bag * bag).sum(-1))
        false = model.score(model(img, swapped, swapped_mask), (bag * swapped_bag).sum(-1))
    assert torch.allclose(bag, swapped_bag)  # the dual side cannot tell them apart
    assert (true > false).float().mean() >= 0.9


def test_neighbour_batches_keep_confusable_images_together(tmp_path):
    from pathlib import Path

    from itm.training.data import ImageCaptions
    data = [ImageCaptions(Path(f"/x/{i}.png"), (f"c{i}",)) for i in range(12)]
    near = [[(i + 6) % 12] for i in range(12)]  # each image's neighbour: the one 6 away
    batch = train_mod.batch_rows(data, seed=0, epoch=0, index=0, size=4, near=near)
    ids = [r.item for r in batch]
    assert len(ids) == 4 and ids[1] == (ids[0] + 6) % 12 and ids[3] == (ids[2] + 6) % 12
    assert train_mod.batch_rows(data, 0, 0, 0, 4) == train_mod.batch_rows(data, 0, 0, 0, 4)  # seeded


def test_neighbours_need_frozen_encoders(tmp_path, caption_file, tiny_spec):
    with pytest.raises(ItmError, match="frozen encoders"):
        train(tiny_spec, load_dataset(caption_file), tmp_path / "n",
              TrainOptions(**OPTS, neighbours=2, train_encoders=True))


@pytest.fixture
def karpathy_with_negatives(tmp_path):
    """8 images in twin pairs (image 2k and 2k+1), each caption with a false twin, as itm.data.synth writes them."""
    paths = write_images(tmp_path / "imgs", 8, size=(32, 32))
    images = []
    for i, p in enumerate(paths):
        rel = p.relative_to(tmp_path)
        twin = paths[i ^ 1].relative_to(tmp_path)
        sentences = [{"raw": f"picture {i} with {c}", "negative": f"picture {i} without {c}"} for c in ("red", "blue")]
        images.append({"filepath": str(rel.parent), "filename": rel.name, "split": "train" if i < 6 else "val",
                       "sentences": sentences, "twin": str(twin.relative_to(rel.parent)) if twin.parent == rel.parent
                       else None})
    (tmp_path / "d.json").write_text(json.dumps({"images": images}))
    return tmp_path / "d.json"


def known_negatives_seen(monkeypatch) -> list:
    """The KnownNegatives each step hands the loss, appended as training runs."""
    seen = []
    real = train_mod.ItmLoss.forward

    def spy(self, *args, known=None, **kwargs):
        seen.append(known)
        return real(self, *args, known=known, **kwargs)

    monkeypatch.setattr(train_mod.ItmLoss, "forward", spy)
    return seen


def test_known_negatives_reach_the_loss(tmp_path, karpathy_with_negatives, tiny_spec, monkeypatch):
    data = load_dataset(karpathy_with_negatives)
    assert all(d.negatives for d in data) and any(d.hard_images for d in data)
    seen = known_negatives_seen(monkeypatch)
    batches = []
    real_batch = train_mod.batch_rows
    monkeypatch.setattr(train_mod, "batch_rows", lambda *a, **k: batches.append(real_batch(*a, **k)) or batches[-1])
    train(tiny_spec, data, tmp_path / "r", TrainOptions(**{**OPTS, "max_steps": 2, "batch_size": 6}))
    for known, rows in zip(seen, batches):
        assert known.text_valid.all() and known.text_feats.shape[0] == len(rows)
        twin_of = {d.image: d.hard_images for d in data}
        for r, h in zip(rows, known.images.tolist()):  # each caption's twin, where it is in the batch
            twin_rows = [k for k, o in enumerate(rows) if data[o.item].image in twin_of[data[r.item].image]]
            assert h == (twin_rows[0] if twin_rows else -1)
    assert any((k.images >= 0).any() for k in seen)  # twins are batched together


def test_more_negatives_are_drawn_each_step_beside_the_hard_negative():
    from pathlib import Path

    from itm.training.data import ImageCaptions
    data = [ImageCaptions(Path("/x/0.png"), ("c0", "c1"), ("n0", None), more_negatives=(("a", "b", "c"), ("d",))),
            ImageCaptions(Path("/x/1.png"), ("c2",))]
    rows = [train_mod.Row(0, 0), train_mod.Row(0, 1), train_mod.Row(1, 0)]
    opts = TrainOptions(more_negatives=2)
    first, *more = train_mod.false_captions(data, rows, opts, step=7)
    assert first == ["n0", None, None] and len(more) == 2
    drawn = [column[0] for column in more]
    assert len(set(drawn)) == 2 and set(drawn) <= {"a", "b", "c"}  # without replacement, from the caption's own
    assert [column[1] for column in more] == ["d", None] and [c[2] for c in more] == [None, None]
    assert train_mod.false_captions(data, rows, opts, step=7) == [first, *more]  # seeded by the step
    steps = {tuple(c[0] for c in train_mod.false_captions(data, rows, opts, step=s)[1:]) for s in range(20)}
    assert len(steps) > 1  # and drawn afresh at each
    assert train_mod.false_captions(data, rows, replace(opts, more_negatives=0), step=7) == [first]
    assert train_mod.false_captions(data, rows, replace(opts, caption_negatives=False), step=7) == []


def test_more_negatives_need_data_that_names_them(tmp_path, karpathy_with_negatives, tiny_spec):
    with pytest.raises(ItmError, match="names none"):
        train(tiny_spec, load_dataset(karpathy_with_negatives), tmp_path / "r",
              TrainOptions(**{**OPTS, "max_steps": 1, "more_negatives": 1}))


def test_more_negatives_reach_the_loss_as_further_false_captions(tmp_path, karpathy_with_negatives, tiny_spec,
                                                                  monkeypatch):
    images = json.loads(karpathy_with_negatives.read_text())
    for im in images["images"]:
        for s in im["sentences"]:
            s["more_negatives"] = [s["negative"] + " or so", s["negative"] + " at all"]
    karpathy_with_negatives.write_text(json.dumps(images))
    seen = known_negatives_seen(monkeypatch)
    r = train(tiny_spec, load_dataset(karpathy_with_negatives), tmp_path / "r",
              TrainOptions(**{**OPTS, "max_steps": 2, "batch_size": 6, "more_negatives": 2}))
    assert r.steps == 2 and len(seen) == 2
    for known in seen:  # three false captions per image: its hard negative and two more
        b = len(known.images)
        assert known.text_valid.shape == (3 * b,) and known.text_valid.all() and known.text_feats.shape[0] == 3 * b


def test_validation_keeps_the_best_checkpoint_and_patience_stops(tmp_path, karpathy_with_negatives, tiny_spec):
    data, val = load_dataset(karpathy_with_negatives), load_dataset(karpathy_with_negatives, split="val")
    opts = TrainOptions(**{**OPTS, "max_steps": 12, "batch_size": 4, "eval_every": 2, "patience": 2, "log_every": 2,
                           "lr": 0.0, "encoder_lr": 0.0})
    r = train(tiny_spec, data, tmp_path / "r", opts, val_data=val)
    # nothing can improve at learning rate 0: the first validation stays best, two more end the run
    assert r.steps == 6 and r.best_step == 2 and [v["step"] for v in r.validation] == [2, 4, 6]
    assert r.reranker == tmp_path / "r" / "best" / train_mod.RERANKER_FILE and r.reranker.exists()
    assert {"rsum", "swap", "score"} <= set(r.validation[0])
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x] == [2, 4, 6]
    assert [x["step"] for x in log if "val" in x] == [2, 4, 6]
    with pytest.raises(ItmError, match="validation"):
        train(tiny_spec, data, tmp_path / "x", opts, val_data=[])


def test_validating_many_score_weights_at_once_equals_validating_each(karpathy_with_negatives, tiny_encoder):
    """One pass for several weights of the match logit gives each weight's figures as validating with it alone."""
    import dataclasses

    from itm.training.train import validate, validate_weights

    val = load_dataset(karpathy_with_negatives)
    torch.manual_seed(0)
    reranker = FusionReranker(get_fusion_config("fusion-tiny", image_width=tiny_encoder.image_width,
                                                text_width=tiny_encoder.text_width))
    with torch.no_grad():  # a sharp head, so that the weight changes the order
        reranker.head[-1].weight.mul_(50.0)
    weights = (0.0, 0.3, 10.0)
    many = validate_weights(tiny_encoder, reranker, val, 4, weights)
    alone = {}
    for w in weights:
        reranker.cfg = dataclasses.replace(reranker.cfg, score_weight=w)
        alone[w] = validate(tiny_encoder, reranker, val, 4)
    assert many == alone
    assert len({json.dumps(f, sort_keys=True) for f in many.values()}) > 1  # the weights rank differently
    assert reranker.training  # validation leaves the model as it found it


def test_region_shares_split_a_box_over_the_grid():
    centre = grounding_mod.region_shares((1 / 3, 1 / 3, 2 / 3, 2 / 3), 3)
    assert centre.shape == (10,) and int(centre.argmax()) == 5 and centre[0] == 0
    torch.testing.assert_close(centre.sum(), torch.tensor(1.0))
    corner = grounding_mod.region_shares((0.0, 0.0, 0.5, 0.5), 2)  # exactly the top-left of a 2x2 grid
    torch.testing.assert_close(corner, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    half = grounding_mod.region_shares((0.0, 0.0, 1.0, 0.5), 2)  # the top row
    torch.testing.assert_close(half, torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]))


def test_phrase_tokens_are_the_phrases_own_ids():
    import open_clip

    from itm.training.data import Phrase

    tok = open_clip.SimpleTokenizer(context_length=32)
    text = "there is a large blue square, and also a small red circle"
    start = text.index("small red circle")
    span = grounding_mod.phrase_tokens(tok, text, Phrase(start, start + len("small red circle"), (0, 0, 1, 1)))
    ids = tok([text])[0].tolist()
    assert ids[span.start:span.stop] == tok.encode("small red circle")


def test_grounded_phrases_reach_the_loss(tmp_path, tiny_spec, monkeypatch):
    paths = write_images(tmp_path / "imgs", 6, size=(32, 32))
    box = [0.5, 0.0, 1.0, 0.5]  # top right
    images = [{"filepath": str(p.parent.relative_to(tmp_path)), "filename": p.name, "split": "train",
               "sentences": [{"raw": f"a red circle number {i}", "phrases": [{"span": [2, 12], "box": box}]}]}
              for i, p in enumerate(paths)]
    (tmp_path / "d.json").write_text(json.dumps({"images": images}))
    data = load_dataset(tmp_path / "d.json")
    seen = []
    real = train_mod.ItmLoss.forward

    def spy(self, *args, grounding=None, **kwargs):
        parts = real(self, *args, grounding=grounding, **kwargs)
        seen.append((grounding, parts))
        return parts

    monkeypatch.setattr(train_mod.ItmLoss, "forward", spy)
    r = train(tiny_spec, data, tmp_path / "r", TrainOptions(**{**OPTS, "max_steps": 2, "batch_size": 4}))
    grounding, parts = seen[0]
    regions = get_fusion_config("fusion-tiny").regions
    expected = grounding_mod.region_shares(tuple(box), regions)
    assert grounding.rows.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # "red" and "circle" of each caption
    assert grounding.tokens.tolist() == [2, 3] * 4  # after the start token and "a"
    torch.testing.assert_close(grounding.targets, expected.expand(8, -1))
    assert torch.isfinite(parts["grounding"]) and parts["grounding"] > 0 and "grounding" in r.losses
    seen.clear()
    train(tiny_spec, data, tmp_path / "r0", TrainOptions(**{**OPTS, "max_steps": 1, "grounding_weight": 0.0}))
    assert seen[0][0] is None and "grounding" not in seen[0][1]


def test_frozen_encoders_encode_each_image_and_text_once(tmp_path, karpathy_with_negatives, tiny_spec, monkeypatch):
    """A reranker's run keeps what the frozen encoders make of each item: later epochs encode nothing, and the
    losses are those of encoding every batch afresh."""
    from itm.models.encoder import DualEncoder

    data = load_dataset(karpathy_with_negatives)
    texts = {t for d in data for t in (*d.captions, *(n for n in d.negatives or () if n))}
    encoded = {"images": 0, "texts": []}
    real_images, real_texts = DualEncoder.encode_images, DualEncoder.encode_texts

    def count_images(self, pixels, *a, **k):
        encoded["images"] += len(pixels)
        return real_images(self, pixels, *a, **k)

    def count_texts(self, batch, *a, **k):
        encoded["texts"] += list(batch)
        return real_texts(self, batch, *a, **k)

    monkeypatch.setattr(DualEncoder, "encode_images", count_images)
    monkeypatch.setattr(DualEncoder, "encode_texts", count_texts)
    opts = TrainOptions(**{**OPTS, "max_steps": 4 * len(data), "batch_size": 4, "save_every": 100})
    cached = train(tiny_spec, data, tmp_path / "a", opts)
    assert encoded["images"] == len(data)  # each image once, though every image was drawn four times
    assert len(encoded["texts"]) == len(set(encoded["texts"])) and set(encoded["texts"]) <= texts
    encoded.update(images=0, texts=[])
    drawn = []
    real_batch = train_mod.batch_rows
    monkeypatch.setattr(train_mod, "batch_rows", lambda *a, **k: drawn.append(real_batch(*a, **k)) or drawn[-1])
    fresh = train(tiny_spec, data, tmp_path / "b", TrainOptions(**{**OPTS, "max_steps": 4 * len(data), "batch_size": 4,
                                                                   "save_every": 100, "feature_cache_gb": 0}))
    assert encoded["images"] == sum(map(len, drawn)) > 3 * len(data)  # without the cache, every step encodes its batch
    assert cached.losses == pytest.approx(fresh.losses, rel=1e-4)
    a, b = load_file(str(cached.reranker)), load_file(str(fresh.reranker))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_frozen_features_are_the_encoders_own(caption_file, tiny_encoder):
    """Kept rows, stacked and padded again, equal the encoders' output for the same batch where it is read."""
    data = load_dataset(caption_file)
    cfg = get_fusion_config("fusion-tiny", image_width=tiny_encoder.image_width, text_width=tiny_encoder.text_width)
    images = train_mod.ImageCache(tiny_encoder, 0, None)
    frozen = train_mod.FrozenFeatures(tiny_encoder, images, cfg, budget_gb=1.0)
    texts = ["a", "picture 3 with red", "a much longer caption than the others, with more words", "picture 3 with red"]
    paths = [d.image for d in data[:5]]
    frozen.fill(paths[:2], texts[:2])  # some kept, the rest encoded when asked for
    assert set(frozen.text) == set(texts[:2]) and set(frozen.image) == set(paths[:2])
    got_texts = got = frozen.encode_texts(texts)
    want = tiny_encoder.encode_texts(texts, cfg.text_layers)
    assert set(frozen.text) == set(texts[:2])  # filled once, not as batches come
    assert torch.equal(got.mask, want.mask) and torch.allclose(got.embeddings, want.embeddings, atol=1e-5)
    for g, w in zip(got.tokens, want.tokens):
        assert torch.allclose(g[got.mask], w[want.mask], atol=1e-5) and not g[~got.mask].any()
    got, keep = frozen.encode_images(paths)
    pixels, _ = images.get(paths)
    want = tiny_encoder.encode_images(pixels, cfg.image_layers)
    assert keep == list(range(5)) and got.grid == want.grid
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got.tokens, want.tokens))
    tiny = train_mod.FrozenFeatures(tiny_encoder, images, cfg, budget_gb=1e-9)  # no room: encoded, not kept
    tiny.fill(paths, texts)
    again = tiny.encode_texts(texts)
    assert not tiny.text and not tiny.image and torch.equal(again.mask, got_texts.mask)


def test_adamw_is_fused_on_cpu_and_updates_as_the_default_does():
    torch.manual_seed(0)
    start = [torch.randn(40, 30), torch.randn(30)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(20)]
    results = []
    for make in (lambda ps: train_mod.adamw(ps, lr=1e-2, weight_decay=0.1),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)):
        params = [p.clone().requires_grad_() for p in start]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results.append((opt, params))
    (fused, got), (loop, want) = results
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
    assert not torch.allclose(got[0], start[0])  # the parameters moved


def test_adamw_falls_back_where_there_is_no_fused_kernel(monkeypatch):
    made = []

    class NoFused(torch.optim.AdamW):
        def __init__(self, params, fused=None, **kw):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
            made.append(kw)
            super().__init__(params, **kw)

    monkeypatch.setattr(train_mod.torch.optim, "AdamW", NoFused)
    opt = train_mod.adamw([torch.zeros(3, requires_grad=True)], lr=0.5, weight_decay=0.0)
    assert isinstance(opt, NoFused) and made == [{"lr": 0.5, "weight_decay": 0.0}]


def test_training_takes_the_fused_optimizer_only_when_asked(tmp_path, caption_file, tiny_spec, monkeypatch):
    made = []
    real = train_mod.adamw
    monkeypatch.setattr(train_mod, "adamw", lambda *a, **k: made.append(1) or real(*a, **k))
    data = load_dataset(caption_file)
    loop = train(tiny_spec, data, tmp_path / "a", TrainOptions(**{**OPTS, "max_steps": 1}))
    assert not made
    fused = train(tiny_spec, data, tmp_path / "b", TrainOptions(**{**OPTS, "max_steps": 1}, fused_optimizer=True))
    assert made == [1] and loop.steps == fused.steps == 1
