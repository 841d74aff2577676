"""itm-calibrate (run in this process): a calibration fitted on held-out synthetic data lands beside the reranker, and a
search of an index built with that reranker uses it."""
import json
import sys

import pytest
import torch

from itm.indexer.build import build_index
from itm.models.checkpoint import file_sha256
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.models.fusion_checkpoint import save_reranker
from itm.models.registry import resolve_model
from itm.retrieval.query import Refine
from itm.retrieval.search import Searcher
from itm.training import calibrate_cli
from tests.conftest import write_images


def test_a_fitted_calibration_is_stored_beside_the_reranker_and_used_by_search(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    reranker = save_reranker(FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval(),
                             tmp_path / "reranker.safetensors")
    monkeypatch.setattr(sys, "argv", ["itm-calibrate", "--model", "itm-tiny", "--pretrained", "random", "--reranker",
                                      str(reranker), "--images", "12", "--queries", "12", "--rerank-k", "6"])
    with pytest.raises(SystemExit) as done:  # in this process: torch and the tiny model's exports are loaded already
        calibrate_cli.main()
    out, err = capsys.readouterr()
    assert done.value.code in (0, None), err
    sidecar = tmp_path / "reranker.calibration.json"
    assert str(sidecar) in out and "ECE" in out
    saved = json.loads(sidecar.read_text())
    assert saved["reranker_sha256"] == file_sha256(reranker) and saved["fitted_on"]["pairs"] == 12 * 6
    write_images(tmp_path / "photos", 4)
    build_index(tmp_path / "photos", tmp_path / "idx", resolve_model("itm-tiny", "random", reranker=reranker))
    s = Searcher(tmp_path / "idx")
    assert s.calibration.calibrated and s.calibration.a == saved["a"]
    hits = s.search("a red square", k=4, refine=Refine(min_prob=0.0))
    for h in hits:
        assert abs(h.probability - 1 / (1 + torch.exp(torch.tensor(-(saved["a"] * h.match_logit + saved["b"]))))) < 1e-5
