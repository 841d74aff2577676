"""Two-stage search through an index whose rerank store was built by a (tiny, random) reranker."""
import json

import numpy as np
import pytest
import torch

from itm.common.errors import CheckpointError, ModelMismatchError
from itm.indexer import store
from itm.indexer.build import BuildOptions, build_index
from itm.models.fusion import FusionReranker, bytes_per_image, get_fusion_config
from itm.models.fusion_checkpoint import save_reranker
from itm.models.registry import resolve_model
from itm.retrieval.search import Searcher
from itm.training.data import ImageCaptions
from itm.training.evaluate import embed_dataset, rank
from tests.conftest import write_images


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory):
    torch.manual_seed(0)
    model = FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval()
    return save_reranker(model, tmp_path_factory.mktemp("rr") / "reranker.safetensors")


@pytest.fixture
def index(tmp_path, image_folder, text_file, reranker_path):
    spec = resolve_model("itm-tiny", "random", reranker=reranker_path)
    idx = tmp_path / "idx"
    build_index(image_folder, idx, spec, BuildOptions(batch_size=5))
    build_index(text_file, idx, spec, BuildOptions(batch_size=3))
    return idx


def test_store_holds_projected_tokens_within_budget(index):
    snap = store.Snapshot.open(index)
    rr = snap.manifest.reranker
    cfg = get_fusion_config("fusion-tiny")
    tok = snap.gather(snap.kind_rows("image"), "tok")
    assert tok.dtype == np.float16 and tok.shape[1:] == rr.image_shape == (2, 5, 32)
    assert tok[0].nbytes == bytes_per_image(cfg)
    assert snap.gather(snap.kind_rows("text"), "mask").dtype == bool
    assert (index / rr.file).exists()  # the index carries its reranker


def test_text_query_is_reranked_and_batched_equals_one_at_a_time(index):
    s = Searcher(index)
    assert s.has_reranker
    hits = s.search(text="a red square", k=4, rerank_k=8)
    assert len(hits) == 4 and all(h.match_logit is not None for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for h in hits:  # final score = recall + weight * logit, as --json shows both parts
        assert h.score == pytest.approx(h.recall_score + s.scorer.weight * h.match_logit, abs=1e-5)
    # oracle: score each candidate on its own with the torch models, outside the batched pass
    t = Searcher(index, backend="torch")
    reranker = t.scorer.model
    q = t.encoder.dual.encode_texts(["a red square"], reranker.cfg.text_layers)
    txt, mask = reranker.encode_text_store(q.tokens, q.mask)
    snap = s.snapshot
    ids = snap.rows.column("id").to_pylist()
    for h in hits:
        row = np.array([ids.index(h.id)])
        with torch.no_grad():
            one = reranker(torch.from_numpy(snap.gather(row, "tok")), txt.half(), mask)
        assert float(one) == pytest.approx(h.match_logit, abs=1e-4)
    plain = Searcher(index, rerank=False).search(text="a red square", k=4)
    assert all(h.match_logit is None for h in plain)


def test_rerank_changes_order_only_inside_the_top_k(index):
    s = Searcher(index)
    recall_order = [h.id for h in Searcher(index, rerank=False).search(text="a blue circle", k=12)]
    reranked = [h.id for h in s.search(text="a blue circle", k=12, rerank_k=5)]
    assert set(reranked[:5]) == set(recall_order[:5]) and reranked[5:] == recall_order[5:]


def test_image_query_reranks_texts(index, image_folder):
    hits = Searcher(index).search(image=sorted(image_folder.rglob("*.png"))[0], k=3, kind="text")
    assert len(hits) == 3 and all(h.kind == "text" and h.match_logit is not None for h in hits)


def test_reranker_that_does_not_fit_is_refused(tmp_path, image_folder, index, reranker_path):
    other = FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64))
    path = save_reranker(other, tmp_path / "other.safetensors")
    with pytest.raises(ModelMismatchError, match="rerank store for reranker"):
        build_index(image_folder, index, resolve_model("itm-tiny", "random", reranker=path))
    wide = save_reranker(FusionReranker(get_fusion_config("fusion-tiny", image_width=96, text_width=64)),
                         tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match="expects token widths 96/64"):
        build_index(image_folder, tmp_path / "idx2", resolve_model("itm-tiny", "random", reranker=wide))


def test_index_without_store_says_so(tmp_path, image_folder, tiny_spec):
    build_index(image_folder, tmp_path / "plain", tiny_spec)
    s = Searcher(tmp_path / "plain")
    assert not s.has_reranker
    assert all(h.match_logit is None for h in s.search(text="x", k=2))
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["reranker"] is None


def test_searcher_ranks_as_evaluation_does_both_ways(tmp_path, reranker_path):
    """Oracle: evaluate.rank's dense, all-pairs two-stage ranking over the same images and captions."""
    paths = sorted(write_images(tmp_path / "imgs", 10, seed=3))
    words = ["red", "green", "blue", "yellow", "round", "square", "small", "large", "left", "right"]
    data = [ImageCaptions(p, (f"a {words[i]} thing {i}", f"{words[(3 * i) % 10]} and {words[(7 * i) % 10]} {i}"))
            for i, p in enumerate(paths)]
    (tmp_path / "captions.txt").write_text("".join(f"{c}\n" for d in data for c in d.captions))
    spec = resolve_model("itm-tiny", "random", reranker=reranker_path)
    idx = tmp_path / "idx"
    build_index(tmp_path / "imgs", idx, spec, BuildOptions(batch_size=3))
    build_index(tmp_path / "captions.txt", idx, spec, BuildOptions(batch_size=3))
    s, t = Searcher(idx), Searcher(idx, backend="torch")  # exported graphs, against evaluation's torch models
    feats = embed_dataset(t.encoder.dual, t.scorer.model, data, batch_size=4)
    ranks = rank(feats, t.scorer.model, rerank_k=4)
    image_of = {str(d.image): i for i, d in enumerate(data)}
    for q, text in enumerate(feats.texts):  # text -> images, the top 4 reranked
        hits = s.search(text=text, k=10, rerank_k=4)
        assert [image_of[h.path] for h in hits] == ranks.t2i_order[q].tolist()
    caption_of = {t: j for j, t in enumerate(feats.texts)}
    for i, d in enumerate(data):  # image -> texts, the top 4 reranked
        hits = s.search(image=d.image, kind="text", k=20, rerank_k=4)
        assert [caption_of[h.text] for h in hits] == ranks.i2t_order[i].tolist()
        assert all(h.match_logit is not None for h in hits[:4]) and all(h.match_logit is None for h in hits[4:])
