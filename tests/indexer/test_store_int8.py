"""The int8 rerank store: a scale per token, half the bytes, read back as float16 for the reranker."""
import json

import numpy as np
import pytest

from itm.common.errors import ItmError
from itm.indexer import store
from itm.indexer.build import BuildOptions, build_index
from itm.indexer.compact import compact_index
from itm.models.registry import resolve_model
from itm.retrieval.search import Searcher
from tests.retrieval.test_rerank_search import reranker_path  # noqa: F401 (a module fixture)


def test_quantized_features_are_within_half_a_step_and_quantizing_again_changes_nothing():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((50, 3, 17, 64)) * rng.uniform(0.01, 5, (50, 3, 17, 1))).astype(np.float16)
    x[0, 0, 0] = 0  # an all-zero token (padding) stays zero
    q, scale = store.quantize_int8(x)
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == x.shape[:-1]
    back = store.dequantize_int8(q, scale)
    step = scale.astype(np.float32)[..., None]
    assert np.all(np.abs(back.astype(np.float32) - x.astype(np.float32)) <= 0.5 * step + 2e-3 * np.abs(x) + 1e-6)
    assert not back[0, 0, 0].any()
    q2, scale2 = store.quantize_int8(back)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(scale2, scale)


@pytest.fixture
def indexes(tmp_path, image_folder, text_file, reranker_path):  # noqa: F811
    spec = resolve_model("itm-tiny", "random", reranker=reranker_path)
    out = {}
    for dtype in ("fp16", "int8"):
        idx = tmp_path / dtype
        build_index(image_folder, idx, spec, BuildOptions(batch_size=5, store_dtype=dtype))
        build_index(text_file, idx, spec, BuildOptions(batch_size=3))  # the index's own dtype is kept
        out[dtype] = idx
    return out


def test_int8_index_stores_half_the_bytes_and_reranks_as_the_fp16_one(indexes):
    fp16, int8 = (store.Snapshot.open(indexes[d]) for d in ("fp16", "int8"))
    assert int8.manifest.reranker.store_dtype == "int8" and fp16.manifest.reranker.store_dtype is None
    assert "store_dtype" not in json.loads((indexes["fp16"] / "manifest.json").read_text())["reranker"]
    assert not list(indexes["int8"].glob("seg-*.tok.npy")) and list(indexes["int8"].glob("seg-*.tok8.npy"))
    rows = fp16.kind_rows("image")
    a, b = fp16.gather(rows, "tok"), int8.gather(rows, "tok")
    assert b.dtype == np.float16 and b.shape == a.shape
    step = np.abs(a.astype(np.float32)).max(axis=-1, keepdims=True) / 127
    assert np.all(np.abs(a.astype(np.float32) - b.astype(np.float32)) <= 0.5 * step + 1e-3)
    size = lambda idx, pat: sum(p.stat().st_size for p in idx.glob(pat))  # noqa: E731
    assert size(indexes["int8"], "seg-*.tok8.npy") + size(indexes["int8"], "seg-*.tokscale.npy") \
        < 0.6 * size(indexes["fp16"], "seg-*.tok.npy")
    h16 = Searcher(indexes["fp16"]).search(text="a red square", k=6, rerank_k=12)
    h8 = Searcher(indexes["int8"]).search(text="a red square", k=6, rerank_k=12)
    assert [h.path for h in h8] == [h.path for h in h16]
    np.testing.assert_allclose([h.match_logit for h in h8], [h.match_logit for h in h16], atol=0.02)


def test_store_dtype_is_fixed_when_the_index_is_made_and_survives_compaction(indexes, image_folder, reranker_path):  # noqa: F811
    spec = resolve_model("itm-tiny", "random", reranker=reranker_path)
    with pytest.raises(ItmError, match="keeps its rerank store as int8"):
        build_index(image_folder, indexes["int8"], spec, BuildOptions(store_dtype="fp16"))
    before = store.Snapshot.open(indexes["int8"])
    rows = before.rows.to_pylist()
    old = {rows[i]["path"]: t for i, t in zip(before.kind_rows("image"), before.gather(before.kind_rows("image"), "tok"))}
    for p in sorted(image_folder.rglob("*.png"))[:6]:
        p.unlink()
    build_index(image_folder, indexes["int8"], spec, BuildOptions(compact_at=2.0))
    assert compact_index(indexes["int8"]).dead_rows == 6
    after = store.Snapshot.open(indexes["int8"])
    rows = after.rows.to_pylist()
    for i, t in zip(after.kind_rows("image"), after.gather(after.kind_rows("image"), "tok")):
        np.testing.assert_array_equal(t, old[rows[i]["path"]])  # rewritten as the same int8 bytes: no more loss
