"""itm-calibrate as a user runs it: a calibration fitted on held-out synthetic data lands beside the reranker, and a
search of an index built with that reranker uses it."""
import json
import subprocess
import sys

import torch

from indexer.build import build_index
from indexer.checkpoint import file_sha256
from indexer.models import resolve_model
from retrieval.checkpoint import save_reranker
from retrieval.fusion import FusionReranker, get_fusion_config
from retrieval.query import Refine
from retrieval.search import Searcher
from tests.conftest import write_images


def test_a_fitted_calibration_is_stored_beside_the_reranker_and_used_by_search(tmp_path):
    torch.manual_seed(0)
    reranker = save_reranker(FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval(),
                             tmp_path / "reranker.safetensors")
    r = subprocess.run([sys.executable, "-m", "retrieval.calibrate_cli", "--model", "itm-tiny", "--pretrained", "random",
                        "--reranker", str(reranker), "--images", "12", "--queries", "12", "--rerank-k", "6"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    sidecar = tmp_path / "reranker.calibration.json"
    assert str(sidecar) in r.stdout and "ECE" in r.stdout
    saved = json.loads(sidecar.read_text())
    assert saved["reranker_sha256"] == file_sha256(reranker) and saved["fitted_on"]["pairs"] == 12 * 6
    write_images(tmp_path / "photos", 4)
    build_index(tmp_path / "photos", tmp_path / "idx", resolve_model("itm-tiny", "random", reranker=reranker))
    s = Searcher(tmp_path / "idx")
    assert s.calibration.calibrated and s.calibration.a == saved["a"]
    hits = s.search("a red square", k=4, refine=Refine(min_prob=0.0))
    for h in hits:
        assert abs(h.probability - 1 / (1 + torch.exp(torch.tensor(-(saved["a"] * h.match_logit + saved["b"]))))) < 1e-5
