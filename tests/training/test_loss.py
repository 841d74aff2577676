"""ItmLoss: named parts, hard-negative mining, weights, and overfitting one small batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itm.models.fusion import FusionReranker, get_fusion_config
from itm.training.loss import PARTS, ItmLoss, mine_hard_negatives, positive_mask

B, GRID, L = 8, (4, 4), 12


@pytest.fixture(scope="module")
def model() -> FusionReranker:
    torch.manual_seed(0)
    return FusionReranker(get_fusion_config("fusion-tiny"))


@pytest.fixture(scope="module")
def batch(model):
    """Encoder outputs for B pairs: token features of two layers, and dual embeddings."""
    g = torch.Generator().manual_seed(1)
    cfg = model.cfg
    images = [torch.randn(B, 1 + GRID[0] * GRID[1], cfg.image_width, generator=g) for _ in range(cfg.n_levels)]
    texts = [torch.randn(B, L, cfg.text_width, generator=g) for _ in range(cfg.n_levels)]
    mask = torch.arange(L)[None] < torch.tensor([3, 5, 12, 8, 4, 6, 10, 7])[:, None]
    image_emb, text_emb = torch.randn(B, 32, generator=g), torch.randn(B, 32, generator=g)
    return images, texts, mask, image_emb, text_emb


def run_loss(loss_fn, model, batch, image_emb=None, text_emb=None, **kwargs):
    images, texts, mask, ie, te = batch
    img = model.encode_image_store(images, GRID)
    txt, txt_mask = model.encode_text_store(texts, mask)
    ie, te = (ie if image_emb is None else image_emb), (te if text_emb is None else text_emb)
    return loss_fn(model, img, txt, txt_mask, F.normalize(ie, dim=-1), F.normalize(te, dim=-1), **kwargs)


def test_parts_are_present_and_finite_with_duplicate_images(model, batch):
    image_ids = torch.tensor([0, 1, 2, 2, 3, 4, 4, 4])  # one image with two captions, one with three
    parts = run_loss(ItmLoss(num_negatives=3), model, batch, image_ids=image_ids,
                     generator=torch.Generator().manual_seed(0))
    assert set(parts) == {*PARTS, "total"}
    for name, value in parts.items():
        assert value.shape == () and torch.isfinite(value), name
    torch.testing.assert_close(parts["total"], sum(parts[p] for p in PARTS))


def test_a_batch_of_one_image_has_no_negatives(model, batch):
    parts = run_loss(ItmLoss(), model, batch, image_ids=torch.zeros(B, dtype=torch.long))
    assert all(torch.isfinite(v) for v in parts.values())
    assert parts["ranking"] == 0


@pytest.mark.parametrize("part", PARTS)
def test_zero_weight_removes_the_parts_gradient(model, batch, part):
    image_emb, text_emb = (x.clone().requires_grad_() for x in batch[3:])

    def grads(weight: float, objective) -> list[torch.Tensor]:
        loss_fn = ItmLoss(hard_negatives="hardest", **{f"{part}_weight": weight})
        parts = run_loss(loss_fn, model, batch, image_emb, text_emb)
        wrt = [*model.parameters(), loss_fn.logit_scale, image_emb, text_emb]
        got = torch.autograd.grad(objective(parts), wrt, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for g, w in zip(got, wrt)]

    others = grads(1.0, lambda p: sum(p[q] for q in PARTS if q != part))
    zeroed = grads(0.0, lambda p: p["total"])
    full = grads(1.0, lambda p: p["total"])
    for a, b in zip(others, zeroed):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(full, zeroed))  # the part did contribute


def test_mining_skips_positives_and_hardest_takes_the_most_similar():
    sim = torch.tensor([[5.0, 4.0, 1.0, 3.0],
                        [2.0, 5.0, 0.0, 1.0],
                        [9.0, 0.0, 5.0, 8.0],
                        [0.0, 7.0, 6.0, 5.0]])
    positives = positive_mask(4, image_ids=torch.tensor([0, 1, 2, 2]))  # rows 2 and 3 show one image
    neg = mine_hard_negatives(sim, positives, num=2, mode="hardest")
    assert neg.texts.tolist() == [[1, 3], [0, 3], [0, 1], [1, 0]]
    assert neg.images.tolist() == [[2, 1], [3, 0], [0, 1], [0, 1]]  # texts 2, 3: only images 0, 1 are other images
    assert neg.texts_valid.all() and neg.images_valid.all()


def test_sampled_negatives_are_never_positives():
    g = torch.Generator().manual_seed(0)
    image_ids = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4])
    positives = positive_mask(B, image_ids=image_ids)
    for _ in range(20):
        neg = mine_hard_negatives(torch.randn(B, B, generator=g) * 3, positives, num=5, generator=g)
        rows = torch.arange(B)[:, None].expand(B, 5)
        assert not positives[rows[neg.texts_valid], neg.texts[neg.texts_valid]].any()
        assert not positives[neg.images[neg.images_valid], rows[neg.images_valid]].any()
        allowed = (~positives).sum(1).clamp(max=5)  # fewer valid slots where the image repeats
        assert neg.texts_valid.sum(1).tolist() == allowed.tolist()
        for idx, ok in zip(neg.texts, neg.texts_valid):  # drawn without replacement
            assert len(set(idx[ok].tolist())) == int(ok.sum())


def test_overfits_a_small_batch():
    torch.manual_seed(0)
    model = FusionReranker(get_fusion_config("fusion-tiny"))
    g = torch.Generator().manual_seed(2)
    cfg = model.cfg
    images = [torch.randn(B, 1 + GRID[0] * GRID[1], cfg.image_width, generator=g) for _ in range(cfg.n_levels)]
    texts = [torch.randn(B, L, cfg.text_width, generator=g) for _ in range(cfg.n_levels)]
    mask = torch.arange(L)[None] < torch.tensor([3, 5, 12, 8, 4, 6, 10, 7])[:, None]
    # learnable dual embeddings stand in for the encoders
    image_emb, text_emb = (torch.nn.Parameter(torch.randn(B, 32, generator=g)) for _ in range(2))
    loss_fn = ItmLoss(hard_negatives="hardest", num_negatives=B - 1)
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-2},
                            {"params": [*loss_fn.parameters(), image_emb, text_emb], "lr": 5e-2}])
    for _ in range(80):
        parts = run_loss(loss_fn, model, (images, texts, mask, image_emb, text_emb))
        opt.zero_grad()
        parts["total"].backward()
        opt.step()
    assert parts["total"].item() < 0.02

    model.eval()
    with torch.no_grad():
        img = model.encode_image_store(images, GRID)
        txt, txt_mask = model.encode_text_store(texts, mask)
        rows, cols = (i.flatten() for i in torch.meshgrid(torch.arange(B), torch.arange(B), indexing="ij"))
        logits = model(img[rows], txt[cols], txt_mask[cols]).view(B, B)  # every image against every text
    eye = torch.eye(B, dtype=torch.bool)
    assert (logits[eye] > 0).all() and (logits[~eye] < 0).all()


def test_contrastive_part_equals_open_clips_clip_loss():
    """Oracle: open_clip's own symmetric InfoNCE, on a batch without repeated images or known negatives."""
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(3)
    image_emb = F.normalize(torch.randn(B, 32, generator=g), dim=-1)
    text_emb = F.normalize(torch.randn(B, 32, generator=g), dim=-1)
    for temperature in (0.07, 0.5):
        loss_fn = ItmLoss(init_temperature=temperature)
        ours = loss_fn(None, None, None, None, image_emb, text_emb)["contrastive"]
        torch.testing.assert_close(ours, ClipLoss()(image_emb, text_emb, loss_fn.scale))


@pytest.mark.parametrize("per_image", [1, 2])
def test_known_negatives_enter_every_part_as_explicit_pairs(model, batch, per_image):
    """Oracle: the loss parts recomputed from an explicit list of pairs, each scored on its own."""
    from itm.training.loss import KnownNegatives

    images, texts, mask, ie, te = batch
    g = torch.Generator().manual_seed(5)
    img = model.encode_image_store(images, GRID)
    txt, txt_mask = model.encode_text_store(texts, mask)
    n = per_image * B  # false captions in blocks of B: row k * B + i is image i's k-th
    false_mask = mask.repeat(per_image, 1)
    false_txt, false_mask = model.encode_text_store([torch.randn(n, L, model.cfg.text_width, generator=g)] * 2,
                                                    false_mask)
    ie, te = F.normalize(ie, dim=-1), F.normalize(te, dim=-1)
    false_emb = F.normalize(torch.randn(n, 32, generator=g), dim=-1)
    valid = torch.tensor([True, False, True, True, True, True, False, True, False, True, True, False, True,
                          True, True, False])[:n]
    hard = torch.tensor([1, -1, 3, 2, -1, 6, 5, 0])  # each caption's confusable image row, or none
    known = KnownNegatives(false_txt, false_mask, false_emb, valid, hard)
    loss_fn = ItmLoss(num_negatives=1, hard_negatives="hardest", margin=0.7)
    parts = loss_fn(model, img, txt, txt_mask, ie, te, known=known)

    score = lambda i, t, m: model(i[None], t[None], m[None])[0]  # noqa: E731
    sim = loss_fn.scale * ie @ te.T
    eye = torch.eye(B, dtype=torch.bool)
    pos = torch.stack([score(img[i], txt[i], txt_mask[i]) for i in range(B)])
    false_of = [[r for r in range(i, n, B) if valid[r]] for i in range(B)]  # each image's valid false captions
    image_negs, text_negs = [], []  # per anchor: logits of its negatives
    for i in range(B):
        j = int(sim[i].masked_fill(eye[i], -1e9).argmax())
        negs = [score(img[i], txt[j], txt_mask[j])] + [score(img[i], false_txt[r], false_mask[r]) for r in false_of[i]]
        image_negs.append(negs)
    for j in range(B):
        i = int(sim[:, j].masked_fill(eye[:, j], -1e9).argmax())
        negs = [score(img[i], txt[j], txt_mask[j])] + ([score(img[hard[j]], txt[j], txt_mask[j])] if hard[j] >= 0 else [])
        text_negs.append(negs)
    all_negs = torch.stack([n for negs in image_negs + text_negs for n in negs])
    logits = torch.cat([pos, all_negs])
    labels = torch.cat([torch.ones(B), torch.zeros(len(all_negs))])
    torch.testing.assert_close(parts["matching"], F.binary_cross_entropy_with_logits(logits, labels))
    violations = [F.relu(0.7 - pos[a] + torch.stack(negs).max()) for negs_list in (image_negs, text_negs)
                  for a, negs in enumerate(negs_list)]
    violations += [F.relu(0.7 - pos[i] + score(img[i], false_txt[r], false_mask[r]))
                   for i in range(B) for r in false_of[i]]
    torch.testing.assert_close(parts["ranking"], torch.stack(violations).mean())
    extra = (loss_fn.scale * ie @ false_emb.T).masked_fill(~valid[None], float("-inf"))
    target = torch.arange(B)
    contrastive = (F.cross_entropy(torch.cat([sim, extra], 1), target) + F.cross_entropy(sim.T, target)) / 2
    torch.testing.assert_close(parts["contrastive"], contrastive)


def test_random_negatives_are_drawn_beside_the_hard_ones():
    g = torch.Generator().manual_seed(0)
    positives = positive_mask(B, image_ids=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    for _ in range(20):
        sim = torch.randn(B, B, generator=g)
        neg = mine_hard_negatives(sim, positives, num=2, mode="hardest", generator=g, num_random=3)
        hardest = mine_hard_negatives(sim, positives, num=2, mode="hardest")
        assert torch.equal(neg.texts[:, :2], hardest.texts) and neg.texts.shape == (B, 5)
        for row, (idx, ok) in enumerate(zip(neg.texts, neg.texts_valid)):
            assert ok.all() and len(set(idx.tolist())) == 5  # distinct, none a positive
            assert not positives[row, idx].any()


def test_grounding_loss_teaches_text_tokens_where_to_look(model, batch):
    """Trained on the grounding part alone, each grounded token ends up attending to its target region."""
    from itm.training.loss import Grounding

    torch.manual_seed(0)
    m = FusionReranker(model.cfg)
    images, texts, mask, ie, te = batch
    ti = m.cfg.image_tokens
    target_region = 1 + torch.arange(B) % (ti - 1)  # pair n's token 1 names region target_region[n]
    grounding = Grounding(torch.arange(B), torch.ones(B, dtype=torch.long), F.one_hot(target_region, ti).float())
    loss_fn = ItmLoss(contrastive_weight=0, matching_weight=0, ranking_weight=0, grounding_weight=1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)

    def looked() -> torch.Tensor:
        with torch.no_grad():
            img, (txt, txt_mask) = m.encode_image_store(images, GRID), m.encode_text_store(texts, mask)
            _, maps = m(img, txt, txt_mask, attention=True)
        return maps[-1][torch.arange(B), 1]  # (B, Ti)

    assert (looked().argmax(-1) == target_region).float().mean() < 0.5
    first = None
    for _ in range(60):
        parts = run_loss(loss_fn, m, batch, grounding=grounding)
        first = float(parts["grounding"].detach()) if first is None else first
        opt.zero_grad()
        parts["total"].backward()
        opt.step()
    assert float(parts["grounding"].detach()) < first / 4
    assert (looked().argmax(-1) == target_region).all()


def test_token_separation_holds_texts_apart_at_their_most_different_real_token():
    from itm.training.loss import token_distances, token_separation_loss
    a = [torch.randn(3, 5, 8) for _ in range(2)]  # 2 layers, 3 texts of 5 tokens
    same = [t.clone() for t in a]
    mask = torch.ones(3, 5, dtype=torch.bool)
    assert torch.allclose(token_separation_loss(a, same, mask, 0.3), torch.tensor(0.3), atol=1e-6)
    apart = [t.clone() for t in a]
    for t in apart:
        t[:, 2] = -t[:, 2]  # one token opposite: cosine distance 2 there, at every layer
    assert torch.allclose(token_distances(a, apart, mask), torch.full((2, 3), 2.0), atol=1e-5)
    assert token_separation_loss(a, apart, mask, 0.3) == 0
    mask[:, 2] = False  # the only difference lies where one text has no token: nothing holds them apart
    assert torch.allclose(token_separation_loss(a, apart, mask, 0.3), torch.tensor(0.3), atol=1e-6)
    # texts nearly alike are pushed apart (texts exactly alike are a saddle: cosine's gradient vanishes there)
    x = [(t + 0.01 * torch.randn_like(t)).requires_grad_() for t in a]
    token_separation_loss(x, same, torch.ones(3, 5, dtype=torch.bool), 0.3).backward()
    with torch.no_grad():
        pushed = [t - 10 * t.grad for t in x]
    ones = torch.ones(3, 5, dtype=torch.bool)
    assert (token_distances(pushed, same, ones) > token_distances(x, same, ones)).all()


def test_region_word_loss_reads_each_phrases_words_from_its_boxes_pooled_tokens():
    from itm.training.loss import PhraseWords, RegionWordHeads, region_word_loss
    torch.manual_seed(0)
    heads = RegionWordHeads((7, 11, 13), (-2, -1), width=8)
    tokens = [torch.randn(2, 5, 8) for _ in range(2)]  # 2 layers, 2 images of CLS + 2x2 regions
    shares = torch.tensor([[0, 1.0, 0, 0, 0], [0, 0.5, 0.5, 0, 0], [0, 0, 0, 0, 1.0]])
    words = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0]])
    phrases = PhraseWords(torch.tensor([0, 1, 1]), shares, words)
    expected = 0
    for t, head in zip(tokens, heads.heads):
        for n, (row, share, hot) in enumerate(zip([0, 1, 1], shares, words)):
            pooled = (share[:, None] * t[row]).sum(0)
            logits = head(F.layer_norm(pooled, (8,)))
            expected += sum(F.binary_cross_entropy_with_logits(logits[v], hot[v]) for v in range(3)) / 3 / 2
    torch.testing.assert_close(region_word_loss(tokens, heads, phrases), expected)
    assert heads.index == {7: 0, 11: 1, 13: 2}
    # its gradient reaches the tokens under each phrase's box, and no others
    x = [t.clone().requires_grad_() for t in tokens]
    region_word_loss(x, heads, phrases).backward()
    moved = [t.grad.abs().sum(-1) > 0 for t in x]
    for m in moved:
        assert m.tolist() == [[False, True, False, False, False], [False, True, True, False, True]]
