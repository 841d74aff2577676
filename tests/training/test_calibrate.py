"""Calibration fitted on a user's judgements: the synthetic world's truth written as judgements fits the calibration
the world's judge fits, unjudged candidates are left out, and bad judgement files are refused in one line."""
import json
import os

import pytest
import torch

from itm.common.errors import ItmError
from itm.models import calibration
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.models.fusion_checkpoint import save_reranker
from itm.models.registry import resolve_model
from itm.retrieval.search import Searcher
from itm.training.calibrate import Judgements, calibrate_on_judgements, candidate_pairs
from itm.training.heldout import HeldOut


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    reranker = save_reranker(FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval(),
                             root / "reranker.safetensors")
    return root, HeldOut.build("val", 12, 0, resolve_model("itm-tiny", "random", reranker=reranker), root)


def _judge_everything(world, queries, rerank_k, path):
    """The world's truth of every candidate, written as a user would write judgements (paths relative to the file)."""
    searcher = Searcher(world.index_dir)
    rows = [{"query": q, "path": os.path.relpath(h.path, path.parent), "relevant": world.is_true(q, h)}
            for q in queries for h in searcher.search(text=q, k=rerank_k, rerank_k=rerank_k)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return searcher, rows


def test_judgements_of_the_world_fit_what_its_truth_checker_fits(world, tmp_path):
    root, held = world
    queries = held.query_mix(12)
    searcher, rows = _judge_everything(held, queries, 6, tmp_path / "judged.jsonl")
    direct = calibration.fit(*candidate_pairs(searcher, queries, held.is_true, 6), searcher.reranker_sha256)
    cal, path = calibrate_on_judgements(held.index_dir, tmp_path / "judged.jsonl", rerank_k=6)
    assert (cal.a, cal.b) == pytest.approx((direct.a, direct.b)) and cal.fitted_on["pairs"] == len(rows)
    assert Searcher(held.index_dir).calibration.a == pytest.approx(cal.a)  # searches of the index now use it
    assert path.parent == held.index_dir


def test_unjudged_candidates_are_left_out(world, tmp_path):
    root, held = world
    queries = held.query_mix(12)
    _, rows = _judge_everything(held, queries, 6, tmp_path / "judged.jsonl")
    kept = rows[::2]
    (tmp_path / "half.jsonl").write_text("\n".join(json.dumps(r) for r in kept))
    judged = Judgements.read(tmp_path / "half.jsonl")
    logits, labels = candidate_pairs(Searcher(held.index_dir), judged.queries, judged.is_true, 6)
    assert len(labels) == len(kept) and labels.sum() == sum(r["relevant"] for r in kept)


@pytest.mark.parametrize("text, message", [
    ("", "holds no judgements"),
    ('{"query": "a dog", "path": "x.png"}\n', "judged.jsonl:1: not a judgement"),
    ('{"query": "a dog", "path": "x.png", "relevant": "yes"}\n', "relevant true or false"),
    ("not json\n", "judged.jsonl:1"),
])
def test_a_bad_judgements_file_is_refused_with_its_line(tmp_path, text, message):
    (tmp_path / "judged.jsonl").write_text(text)
    with pytest.raises(ItmError, match=message):
        Judgements.read(tmp_path / "judged.jsonl")


def test_judgements_with_one_answer_only_cannot_fit(world, tmp_path):
    root, held = world
    query = held.query_mix(2)[0]
    hit = Searcher(held.index_dir).search(text=query, k=1, rerank_k=1)[0]
    (tmp_path / "judged.jsonl").write_text(json.dumps({"query": query, "path": hit.path, "relevant": True}))
    with pytest.raises(ItmError, match="needs both relevant and irrelevant"):
        calibrate_on_judgements(held.index_dir, tmp_path / "judged.jsonl", rerank_k=1)
