"""The fusion reranker: registry, store encoders, and batched scoring against a one-pair-at-a-time oracle."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from itm.common.errors import UnknownModelError
from itm.models.fusion import FusionReranker, bytes_per_image, bytes_per_text, get_fusion_config, list_fusion_models

B, GRID, L = 5, (4, 4), 12  # batch, tiny encoder's patch grid, raw text length


@pytest.fixture(scope="module", params=[{}, {"region_boxes": True, "pair_relations": True, "attended_boxes": True}],
                ids=["plain", "boxes+pairs+looked"])
def model(request) -> FusionReranker:
    torch.manual_seed(0)
    m = FusionReranker(get_fusion_config("fusion-tiny", self_attention=True, **request.param)).eval()
    if m.cfg.attended_boxes:  # it starts at zero, which would leave the path untested
        torch.nn.init.normal_(m.looked_embed.weight)
    return m


def random_tokens(cfg, n=B, lengths=(3, 12, 7, 1, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(n, 1 + GRID[0] * GRID[1], cfg.image_width, generator=g) for _ in range(cfg.n_levels)]
    texts = [torch.randn(n, L, cfg.text_width, generator=g) for _ in range(cfg.n_levels)]
    mask = torch.arange(L)[None] < torch.tensor(lengths[:n])[:, None]  # (n, L)
    return images, texts, mask


@pytest.fixture(scope="module")
def store(model):
    images, texts, mask = random_tokens(model.cfg)
    with torch.no_grad():
        img = model.encode_image_store(images, GRID)
        txt, txt_mask = model.encode_text_store(texts, mask)
    return img, txt, txt_mask


def test_registry_lists_configs_and_applies_overrides():
    assert {"fusion-base", "fusion-tiny"} <= set(list_fusion_models())
    cfg = get_fusion_config("fusion-base", image_width=192, text_width=128)
    assert (cfg.name, cfg.image_width, cfg.text_width) == ("fusion-base", 192, 128)
    assert get_fusion_config("fusion-tiny", image_layers=[-3, -1]).image_layers == (-3, -1)


def test_unknown_config_name_lists_known_ones():
    with pytest.raises(UnknownModelError, match="fusion-base.*fusion-tiny"):
        get_fusion_config("fusion-huge")


@pytest.mark.parametrize("bad", [{"heads": 3}, {"image_layers": (-1, -2)}, {"text_layers": (-1,)},
                                 {"fusion_order": "sideways"}])
def test_invalid_config_fields_are_refused(bad):
    with pytest.raises(ValueError):
        get_fusion_config("fusion-tiny", **bad)


def test_base_store_fits_the_byte_budget():
    cfg = get_fusion_config("fusion-base")
    assert bytes_per_image(cfg) <= 16 * 1024
    assert bytes_per_image(cfg) == cfg.n_levels * (1 + cfg.regions**2) * cfg.d_model * 2
    assert bytes_per_text(cfg) == cfg.n_levels * cfg.max_text_tokens * (cfg.d_model * 2) + cfg.max_text_tokens


def test_store_shapes(model, store):
    cfg = model.cfg
    img, txt, mask = store
    assert img.shape == (B, cfg.n_levels, 1 + cfg.regions**2, cfg.d_model)
    assert txt.shape == (B, cfg.n_levels, cfg.max_text_tokens, cfg.d_model)
    assert mask.sum(1).tolist() == [3, 8, 7, 1, 8]  # lengths clipped to max_text_tokens = 8
    assert torch.all(txt[~mask[:, None].expand_as(txt[..., 0])] == 0)  # padding stored as zeros


def test_long_text_keeps_its_eot_token(model):
    cfg = model.cfg
    _, texts, mask = random_tokens(cfg)  # row 1 has 12 real tokens, more than max_text_tokens
    with torch.no_grad():
        txt, _ = model.encode_text_store(texts, mask)
        for level, x in enumerate(texts):
            p = model.store.text_store[level]
            kept = torch.cat([x[1, :cfg.max_text_tokens - 1], x[1, 11:12]])  # first Tt-1 tokens, then EOT
            torch.testing.assert_close(txt[1, level], p.proj(p.norm(kept)))


def test_image_store_checks_the_grid(model):
    images, _, _ = random_tokens(model.cfg)
    with pytest.raises(ValueError, match="3x3"):
        model.encode_image_store(images, (3, 3))


def test_batched_reranking_equals_one_pair_at_a_time(model, store):
    img, txt, mask = store
    with torch.no_grad():
        batched = model(img, txt, mask)
        single = torch.cat([model(img[i:i + 1], txt[i:i + 1], mask[i:i + 1]) for i in range(B)])
    assert batched.shape == (B,)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("query", ["text", "image"])
def test_shared_query_broadcasts_like_copies(model, store, query):
    img, txt, mask = store
    with torch.no_grad():
        if query == "text":  # text 0 against every image
            shared = model(img, txt[:1], mask[:1])
            copied = model(img, txt[:1].expand(B, -1, -1, -1), mask[:1].expand(B, -1))
        else:  # image 0 against every text
            shared = model(img[:1], txt, mask)
            copied = model(img[:1].expand(B, -1, -1, -1), txt, mask)
    torch.testing.assert_close(shared, copied, rtol=1e-5, atol=1e-5)


def test_named_pairs_equal_indexed_features_with_their_gradients(model, store):
    """pairs=(image rows, text rows) computes each side's own layers once per item: the logits, attention
    maps and gradients must be those of the features indexed into row-aligned pairs first."""
    img, txt, mask = (x.clone() for x in store)
    image_idx, text_idx = torch.tensor([0, 0, 1, 4, 2, 3, 3, 1]), torch.tensor([0, 2, 1, 1, 4, 3, 0, 3])
    img.requires_grad_(True)
    txt.requires_grad_(True)
    indexed, maps = model(img[image_idx], txt[text_idx], mask[text_idx], attention=True)
    grads = torch.autograd.grad(indexed.square().sum(), [img, txt])
    named, named_maps = model(img, txt, mask, attention=True, pairs=(image_idx, text_idx))
    named_grads = torch.autograd.grad(named.square().sum(), [img, txt])
    assert named.shape == (len(image_idx),)
    torch.testing.assert_close(named, indexed, rtol=1e-5, atol=1e-6)
    for a, b in [*zip(named_maps, maps), *zip(named_grads, grads)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_padding_is_masked(model, store):
    img, txt, mask = store
    noisy = txt.clone()
    pad = ~mask[:, None, :, None].expand_as(noisy)
    noisy[pad] = torch.randn(int(pad.sum())) * 100
    with torch.no_grad():
        torch.testing.assert_close(model(img, noisy, mask), model(img, txt, mask), rtol=1e-6, atol=1e-6)


def test_fp16_store_is_accepted(model, store):
    img, txt, mask = store
    with torch.no_grad():
        half = model(img.half(), txt.half(), mask)
        full = model(img.half().float(), txt.half().float(), mask)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full)


def test_score_weight_moves_the_ranking_from_recall_to_the_match_logit(model):
    g = torch.Generator().manual_seed(0)
    logit, recall = torch.randn(20, generator=g), torch.rand(20, generator=g)
    assert model.score(logit, recall, weight=0.0).argsort().tolist() == recall.argsort().tolist()
    assert model.score(logit, recall, weight=1e6).argsort().tolist() == logit.argsort().tolist()


def test_fine_to_coarse_visits_the_levels_in_the_other_order(model, store):
    """Oracle: the same weights in coarse-to-fine order, given the levels reversed."""
    img, txt, mask = store
    f2c = FusionReranker(replace(model.cfg, fusion_order="fine_to_coarse")).eval()
    f2c.load_state_dict(model.state_dict())
    assert f2c.order == [0, 1] and model.order == [1, 0]
    with torch.no_grad():
        torch.testing.assert_close(f2c(img, txt, mask), model(img.flip(1), txt.flip(1), mask))
        assert not torch.allclose(f2c(img, txt, mask), model(img, txt, mask), atol=1e-3)  # the order matters


def test_region_boxes_sit_where_the_store_pools_each_region():
    """Box i must describe the image area the store's region token i averages (row-major, CLS first)."""
    from itm.models.fusion import region_boxes
    from itm.models.store_encoder import StoreEncoder

    h = w = 6
    enc = StoreEncoder(1, 2, 2, 2, regions=3, max_text_tokens=4)
    with torch.no_grad():  # identity projection, no normalisation: the store holds the pooled inputs
        enc.image_store[0].norm = torch.nn.Identity()
        enc.image_store[0].proj.weight.copy_(torch.eye(2))
        enc.image_store[0].proj.bias.zero_()
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([(xs + 0.5) / w * 2 - 1, (ys + 0.5) / h * 2 - 1], -1).view(1, h * w, 2)  # patch centres
    tokens = torch.cat([torch.zeros(1, 1, 2), centres], 1)  # (1, 1 + H*W, 2): CLS, then the grid row by row
    pooled = enc.encode_images([tokens], (h, w))[0, 0]  # (1 + 9, 2) mean patch centre of each region
    torch.testing.assert_close(pooled[1:], region_boxes(3)[1:, :2])
    torch.testing.assert_close(region_boxes(3)[0], torch.tensor([0.0, 0.0, 2.0, 2.0]))


def test_pair_relations_equal_a_loop_over_region_pairs():
    import torch.nn.functional as F

    from itm.models.fusion import PairRelations

    torch.manual_seed(0)
    rel = PairRelations(8, regions=2)
    regions, text = torch.randn(3, 4, 8), torch.randn(3, 8)
    got = rel(regions, text)
    x, q = rel.norm(regions), rel.text(rel.text_norm(text))
    boxes = rel.offsets.new_tensor([[-0.5, -0.5, 1, 1], [0.5, -0.5, 1, 1], [-0.5, 0.5, 1, 1], [0.5, 0.5, 1, 1]])
    for b in range(3):
        pairs = [rel.out(F.gelu(rel.first(x[b, i]) + rel.second(x[b, j]) + rel.geometry(boxes[i] - boxes[j]) + q[b]))
                 for i in range(4) for j in range(4) if i != j]
        torch.testing.assert_close(got[b], torch.stack(pairs).amax(0))


def test_attended_boxes_start_as_the_model_without_them_and_then_change_its_logits():
    torch.manual_seed(0)
    cfg = get_fusion_config("fusion-tiny", self_attention=True, region_boxes=True)
    base = FusionReranker(cfg).eval()
    looked = FusionReranker(replace(cfg, attended_boxes=True)).eval()
    assert set(looked.state_dict()) - set(base.state_dict()) == {"looked_embed.weight", "looked_embed.bias"}
    looked.load_state_dict(base.state_dict(), strict=False)  # the same weights, the new layer still at zero
    images, texts, mask = random_tokens(cfg)
    with torch.no_grad():
        img = base.encode_image_store(images, GRID)
        txt, txt_mask = base.encode_text_store(texts, mask)
        torch.testing.assert_close(looked(img, txt, txt_mask), base(img, txt, txt_mask))
        torch.nn.init.normal_(looked.looked_embed.weight)
        assert not torch.allclose(looked(img, txt, txt_mask), base(img, txt, txt_mask), atol=1e-3)
