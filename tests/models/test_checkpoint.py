"""Reranker checkpoints: exact round trip, identity hash, and refusals that never unpickle."""
from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from itm.common.errors import CheckpointError
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.models.fusion_checkpoint import checkpoint_sha, load_reranker, save_reranker
from itm.models.store_encoder import load_store_encoder


@pytest.fixture(scope="module")
def model() -> FusionReranker:
    torch.manual_seed(0)
    return FusionReranker(get_fusion_config("fusion-tiny", image_width=48, fusion_order="fine_to_coarse")).eval()


@pytest.fixture
def saved(model, tmp_path):
    return save_reranker(model, tmp_path / "reranker.safetensors")


def test_round_trip_gives_identical_outputs(model, saved):
    loaded = load_reranker(saved)
    assert loaded.cfg == model.cfg and not loaded.training
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    img = torch.randn(4, cfg.n_levels, cfg.image_tokens, cfg.d_model, generator=g)
    txt = torch.randn(4, cfg.n_levels, cfg.max_text_tokens, cfg.d_model, generator=g)
    mask = torch.arange(cfg.max_text_tokens)[None] < torch.tensor([[2], [8], [5], [1]])
    with torch.no_grad():
        assert torch.equal(loaded(img, txt, mask), model(img, txt, mask))


def test_sidecar_holds_config_and_format(model, saved):
    meta = json.loads(saved.with_suffix(".json").read_text())
    assert meta["format"] == 1 and meta["kind"] == "fusion_reranker"
    assert meta["fusion_config"] == model.cfg.to_dict()


def test_index_builder_reads_the_same_store_encoder(model, saved):
    cfg = model.cfg
    store_encoder = load_store_encoder(saved, SimpleNamespace(image_width=cfg.image_width, text_width=cfg.text_width))
    assert store_encoder.sha256.startswith(checkpoint_sha(saved))
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 1 + 16, cfg.image_width, generator=g) for _ in range(cfg.n_levels)]
    texts = [torch.randn(3, 10, cfg.text_width, generator=g) for _ in range(cfg.n_levels)]
    mask = torch.arange(10)[None] < torch.tensor([[2], [10], [6]])
    with torch.no_grad():
        assert (store_encoder.images(images, (4, 4)) == model.encode_image_store(images, (4, 4)).half().numpy()).all()
        feats, keep = model.encode_text_store(texts, mask)
    built_feats, built_keep = store_encoder.texts(texts, mask)
    assert (built_feats == feats.half().numpy()).all() and (built_keep == keep.numpy()).all()


def test_sha_identifies_the_weights(model, saved, tmp_path):
    sha = checkpoint_sha(saved)
    assert len(sha) == 16 and sha == checkpoint_sha(saved)
    other = FusionReranker(model.cfg)
    assert checkpoint_sha(save_reranker(other, tmp_path / "other.safetensors")) != sha


def test_pickle_checkpoint_is_refused(model, tmp_path):
    path = tmp_path / "reranker.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="is a pickle checkpoint; itm loads only safetensors"):
        load_reranker(path)


class Boom:
    def __reduce__(self):
        return (pytest.fail, ("the checkpoint was unpickled",))


def test_pickle_named_safetensors_is_never_unpickled(saved):
    saved.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match=str(saved)):
        load_reranker(saved)


def test_missing_or_corrupt_sidecar(saved):
    sidecar = saved.with_suffix(".json")
    sidecar.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_reranker(saved)
    sidecar.unlink()
    with pytest.raises(CheckpointError, match="reranker.json"):
        load_reranker(saved)


def test_sidecar_with_a_bad_config(saved):
    sidecar = saved.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["fusion_config"]["colour"] = "red"
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="colour"):
        load_reranker(saved)


def test_tensors_that_do_not_fit_the_config(model, saved):
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["image_pos"] = torch.zeros(3, model.cfg.d_model)
    del tensors["head.3.bias"]
    save_file(tensors, str(saved))
    with pytest.raises(CheckpointError, match=f"{saved}.*image_pos"):
        load_reranker(saved)


def test_missing_file_and_wrong_kind(tmp_path, saved):
    with pytest.raises(CheckpointError, match="not found"):
        load_reranker(tmp_path / "nothing.safetensors")
    sidecar = saved.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "kind": "dual_encoder"}))
    with pytest.raises(CheckpointError, match="dual_encoder"):
        load_reranker(saved)
