"""Rerankers that travel: hf-hub:ORG/NAME[@REVISION] read from a local cache laid out as huggingface_hub lays it out
(nothing is fetched), a clear line when it is not there, the model card shown by itm-index info, and a reranker whose
card names another encoder refused in one line."""
import json
import shutil

import pytest
import torch

from itm.common.errors import ModelMismatchError, WeightsUnavailableError
from itm.common.options import BuildOptions
from itm.indexer.build import build_index
from itm.indexer.info import index_info
from itm.indexer.store import Snapshot
from itm.models.artifacts import card_path, fetch_reranker, write_card
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.models.fusion_checkpoint import save_reranker
from itm.models.registry import resolve_model
from tests.conftest import write_images

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_ENCODER = {"arch": "itm-tiny", "pretrained": "random", "checkpoint_sha256": None, "embed_dim": 32}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hugging Face cache holding the repo someone/itm-reranker at a commit named by main and by tag v1."""
    import huggingface_hub.constants as constants

    torch.manual_seed(0)
    made = save_reranker(FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval(),
                         tmp_path / "made" / "reranker.safetensors")
    write_card(made, {"encoder": TINY_ENCODER, "data": {"name": "karpathy.json (train)"}, "steps": 7,
                      "evaluation": {"rsum": 123.4}})
    repo = tmp_path / "cache" / "models--someone--itm-reranker"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in ("reranker.safetensors", "reranker.json", "reranker.card.json"):
        shutil.copy(made.parent / f, snapshot / f)
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


@pytest.mark.parametrize("name", ["someone/itm-reranker", "someone/itm-reranker@v1", f"someone/itm-reranker@{COMMIT}"])
def test_a_reranker_named_on_the_hub_is_read_from_its_cache(hub, name):
    assert fetch_reranker(f"hf-hub:{name}") == hub / "reranker.safetensors"


def test_a_reranker_not_in_the_cache_offline_is_one_clear_line(hub):
    with pytest.raises(WeightsUnavailableError, match="hf-hub:someone/other is not in the Hugging Face cache"):
        fetch_reranker("hf-hub:someone/other")


def test_an_index_built_with_a_hub_reranker_shows_its_card(hub, tmp_path):
    write_images(tmp_path / "photos", 3)
    spec = resolve_model("itm-tiny", "random", reranker="hf-hub:someone/itm-reranker@v1")
    build_index(tmp_path / "photos", tmp_path / "idx", spec, BuildOptions(workers=0))
    info = index_info(Snapshot.open(tmp_path / "idx"))
    assert info["reranker_card"]["steps"] == 7 and info["reranker_card"]["encoder"] == TINY_ENCODER
    assert info["reranker"]["source"] == str(hub / "reranker.safetensors")


def test_a_reranker_trained_for_another_encoder_is_refused(hub, tmp_path):
    card = json.loads(card_path(hub / "reranker.safetensors").read_text())
    card["encoder"] = {**TINY_ENCODER, "pretrained": None, "checkpoint_sha256": "f" * 64}
    card_path(hub / "reranker.safetensors").write_text(json.dumps(card))
    write_images(tmp_path / "photos", 2)
    spec = resolve_model("itm-tiny", "random", reranker="hf-hub:someone/itm-reranker")
    refused = r"was trained on itm-tiny/checkpoint ffffffffffff features \(32-d\), not "
    with pytest.raises(ModelMismatchError, match=refused):
        build_index(tmp_path / "photos", tmp_path / "idx", spec, BuildOptions(workers=0))
