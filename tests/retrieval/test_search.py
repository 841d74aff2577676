
import numpy as np
import pytest

from itm.common.errors import EmptyIndexError, IndexNotFoundError, ModelMismatchError, QueryError
from itm.indexer import store
from itm.indexer.build import BuildOptions, build_index
from itm.models.registry import resolve_model
from itm.retrieval.search import Searcher


@pytest.fixture
def index(tmp_path, image_folder, text_file, tiny_spec):
    idx = tmp_path / "idx"
    build_index(image_folder, idx, tiny_spec, BuildOptions(batch_size=4))
    build_index(text_file, idx, tiny_spec, BuildOptions(batch_size=4))
    return idx


def test_text_query_ranks_images_by_cosine(index, tiny_encoder):
    s = Searcher(index)
    hits = s.search(text="a red square", k=5)
    assert len(hits) == 5 and all(h.kind == "image" and h.match_logit is None for h in hits)
    # oracle: brute-force cosine over the stored image embeddings
    snap = store.Snapshot.open(index)
    rows = snap.kind_rows("image")
    q = tiny_encoder.encode_texts(["a red square"]).embeddings.numpy()[0]
    sims = snap.gather(rows, "emb") @ q
    best = np.argsort(-sims)[:5]
    assert [h.id for h in hits] == [snap.rows.column("id")[int(rows[i])].as_py() for i in best]
    np.testing.assert_allclose([h.score for h in hits], sims[best], rtol=1e-5)


def test_image_query_finds_itself_and_the_texts(index, image_folder):
    query = sorted(image_folder.rglob("*.png"))[4]
    hits = Searcher(index).search(image=query, k=3)
    texts = [h for h in hits if h.kind == "text"]
    images = [h for h in hits if h.kind == "image"]
    assert len(texts) == 3 and len(images) == 3
    assert images[0].path == str(query) and images[0].score == pytest.approx(1.0, abs=1e-4)
    only_texts = Searcher(index).search(image=query, k=2, kind="text")
    assert [h.kind for h in only_texts] == ["text", "text"] and only_texts[0].text


def test_k_larger_than_the_index(index):
    assert len(Searcher(index).search(text="anything", k=100)) == 12


def test_query_errors(index, tmp_path):
    s = Searcher(index)
    with pytest.raises(QueryError, match="empty"):
        s.search(text="   ")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(QueryError, match="cannot use query image .*bad.jpg"):
        s.search(image=bad)
    with pytest.raises(QueryError, match="unknown kind"):
        s.search(text="x", kind="video")


def test_missing_empty_and_mismatched_indexes(tmp_path, index, tiny_encoder):
    with pytest.raises(IndexNotFoundError, match="itm-index build"):
        Searcher(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    (empty / "imgs").mkdir(parents=True)
    build_index(empty / "imgs", empty / "idx", resolve_model("itm-tiny", "random"))
    with pytest.raises(EmptyIndexError):
        Searcher(empty / "idx")
    ckpt = tiny_encoder.save(tmp_path / "other.safetensors")
    with pytest.raises(ModelMismatchError, match="was built with itm-tiny/random"):
        Searcher(index, model=resolve_model("itm-tiny", checkpoint=ckpt))


def test_default_index_location_is_shared(monkeypatch, tmp_path, image_folder, tiny_spec):
    monkeypatch.setenv("ITM_INDEX", str(tmp_path / "env-index"))
    build_index(image_folder, None, tiny_spec)
    assert len(Searcher().search(text="a", k=2)) == 2
    assert (tmp_path / "env-index" / "manifest.json").exists()
