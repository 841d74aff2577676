"""The same answers from exported graphs as from torch: an index built and searched on each backend.

Oracle: the torch path (open_clip's models and the FusionReranker, as before there were exported
graphs). Hits must be the same items in the same order, with scores within float tolerance, for
text and image queries, with and without the reranker.
"""
import numpy as np
import pytest
import torch

from itm.indexer.build import BuildOptions, build_index
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.models.fusion_checkpoint import save_reranker
from itm.models.fusion_scorer import OnnxFusion, TorchFusion
from itm.models.registry import resolve_model
from itm.retrieval.search import Searcher
from tests.conftest import COLOURS, write_images

QUERIES = ["a red square", "a blue circle left of a green square", "yellow"]


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """One corpus indexed by each backend, with a reranker and without."""
    root = tmp_path_factory.mktemp("backends")
    images = write_images(root / "images", 16, seed=7)
    (root / "captions.txt").write_text("".join(f"a {c} shape number {i}\n" for i, c in enumerate(list(COLOURS) * 3)))
    torch.manual_seed(0)
    model = FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64, region_boxes=True,
                                             attended_boxes=True)).eval()
    torch.nn.init.normal_(model.looked_embed.weight)  # it starts at zero: give the exported path something to do
    reranker = save_reranker(model, root / "reranker.safetensors")
    out = {}
    for backend in ("onnx", "torch"):
        for name, rr in (("plain", None), ("reranked", reranker)):
            idx = root / f"{backend}-{name}"
            spec = resolve_model("itm-tiny", "random", reranker=rr)
            for source in (root / "images", root / "captions.txt"):
                build_index(source, idx, spec, BuildOptions(batch_size=5, backend=backend))
            out[backend, name] = idx
    return out, images


def same_answers(ours, theirs):
    assert [(h.id, h.kind, h.path, h.text) for h in ours] == [(h.id, h.kind, h.path, h.text) for h in theirs]
    for a, b in zip(ours, theirs):
        assert a.score == pytest.approx(b.score, abs=1e-4) and a.recall_score == pytest.approx(b.recall_score, abs=1e-5)
        assert (a.match_logit is None) == (b.match_logit is None)
        assert a.match_logit is None or a.match_logit == pytest.approx(b.match_logit, abs=1e-4)


@pytest.mark.parametrize("name", ["plain", "reranked"])
def test_text_and_image_queries_give_the_same_hits_on_both_backends(indexes, name):
    idx, images = indexes
    ours, theirs = Searcher(idx["onnx", name]), Searcher(idx["torch", name], backend="torch")
    assert isinstance(ours.scorer, OnnxFusion) if name == "reranked" else ours.scorer is None
    assert isinstance(theirs.scorer, TorchFusion) if name == "reranked" else theirs.scorer is None
    for text in QUERIES:
        same_answers(ours.search(text=text, k=8, rerank_k=10), theirs.search(text=text, k=8, rerank_k=10))
    for image in images[:4]:
        same_answers(ours.search(image=image, k=6, rerank_k=8), theirs.search(image=image, k=6, rerank_k=8))
    if name == "reranked":  # the reranker did reorder something, so the comparison covers it
        recall = [h.id for h in Searcher(idx["onnx", name], rerank=False).search(text=QUERIES[0], k=10)]
        assert [h.id for h in ours.search(text=QUERIES[0], k=10, rerank_k=10)] != recall


def test_indexes_built_on_both_backends_hold_the_same_features(indexes):
    idx, _ = indexes
    a, b = Searcher(idx["onnx", "reranked"]).snapshot, Searcher(idx["torch", "reranked"], backend="torch").snapshot
    for kind in ("image", "text"):
        ra, rb = a.kind_rows(kind), b.kind_rows(kind)
        np.testing.assert_allclose(a.gather(ra, "emb"), b.gather(rb, "emb"), rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.gather(ra, "tok").astype(np.float32), b.gather(rb, "tok").astype(np.float32),
                                   rtol=2**-10, atol=1e-5)
    assert np.array_equal(a.gather(a.kind_rows("text"), "mask"), b.gather(b.kind_rows("text"), "mask"))


def test_a_reranker_that_does_not_export_runs_on_torch(tmp_path, monkeypatch):
    from itm.common.errors import ExportError
    from itm.models import fusion_export
    from itm.models.checkpoint import file_sha256
    from itm.models.item_encoder import Runtime
    from itm.models.loading import load_fusion

    monkeypatch.setenv("ITM_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(3)
    path = save_reranker(FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval(),
                         tmp_path / "reranker.safetensors")
    calls = []

    def refuse(*args):
        calls.append(args)
        raise ExportError("fusion-tiny: not this one")

    monkeypatch.setattr(fusion_export, "export_fusion", refuse)
    for _ in range(2):
        assert isinstance(load_fusion(path, file_sha256(path)), TorchFusion)
    assert len(calls) == 1  # the refusal is remembered
    with pytest.raises(ExportError, match="not this one"):
        load_fusion(path, file_sha256(path), Runtime("onnx"))


def test_a_score_weight_changed_beside_the_same_weights_is_exported_anew(tmp_path, monkeypatch):
    import json

    from itm.models.checkpoint import file_sha256
    from itm.models.item_encoder import Runtime
    from itm.models.loading import load_fusion

    monkeypatch.setenv("ITM_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(4)
    path = save_reranker(FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval(),
                         tmp_path / "reranker.safetensors")
    meta_file = path.with_suffix(".json")
    first = load_fusion(path, file_sha256(path), Runtime("onnx"))
    meta = json.loads(meta_file.read_text())
    meta["fusion_config"]["score_weight"] = first.weight * 3 + 0.5
    meta_file.write_text(json.dumps(meta))
    second = load_fusion(path, file_sha256(path), Runtime("onnx"))
    assert isinstance(second, OnnxFusion)
    assert second.weight == pytest.approx(first.weight * 3 + 0.5)
    assert load_fusion(path, file_sha256(path), Runtime("torch")).weight == pytest.approx(second.weight)
