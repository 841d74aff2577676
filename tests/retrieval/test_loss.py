"""ItmLoss: named parts, hard-negative mining, weights, and overfitting one small batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retrieval.fusion import FusionReranker, get_fusion_config
from retrieval.loss import PARTS, ItmLoss, mine_hard_negatives, positive_mask

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
