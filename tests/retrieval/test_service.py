"""SearchService: the server's search engine without HTTP, against an in-process Searcher as the oracle."""
import io
import threading

import pytest
from PIL import Image

from itm.common.errors import EmptyIndexError, NotInIndexError, QueryError, TooLargeError
from itm.data.corpora import huge_header_png
from itm.indexer.build import BuildOptions, build_index
from itm.models.registry import resolve_model
from itm.retrieval.search import Searcher
from itm.retrieval.service import Limits, Query, SearchService
from tests.conftest import write_images


@pytest.fixture
def index(tmp_path, image_folder, text_file, tiny_rerank_spec):
    idx = tmp_path / "idx"
    build_index(image_folder, idx, tiny_rerank_spec, BuildOptions(batch_size=6, workers=1))
    build_index(text_file, idx, tiny_rerank_spec, BuildOptions(batch_size=6, workers=1))
    return idx


def test_answers_as_the_searcher_does(index, image_folder):
    service, oracle, recall_only = SearchService(index), Searcher(index), Searcher(index, rerank=False)
    query_image = sorted(image_folder.rglob("*.png"))[3]
    a = service.search(Query(text="a red square", k=5, rerank_k=8))
    assert a.reranked and a.generation == 2 and set(a.timings) == {"encode_ms", "recall_ms", "rerank_ms", "total_ms"}
    assert a.hits == oracle.search(text="a red square", k=5, rerank_k=8)
    a = service.search(Query(text="a red square", k=5, rerank=False))
    assert not a.reranked and a.hits == recall_only.search(text="a red square", k=5)
    assert all(h.match_logit is None for h in a.hits)
    expected = oracle.search(image=query_image, k=3)
    assert service.search(Query(image=query_image.read_bytes(), k=3)).hits == expected  # an upload
    assert service.search(Query(image_id=expected[-1].id, k=3)).hits == \
        oracle.search(image=expected[-1].path, k=3)  # "more like this", by row id
    assert service.search(Query(image_path=str(query_image), k=3, kind="text")).hits == \
        oracle.search(image=query_image, k=3, kind="text")
    assert service.queries == 5


def test_bad_queries_are_refused_with_a_message(index, tmp_path):
    service = SearchService(index, limits=Limits(max_upload_bytes=10_000, max_pixels=1_000_000))
    cases = [
        (Query(), QueryError, "give one query"),
        (Query(text="a", image_id=1), QueryError, "give one query"),
        (Query(text="  "), QueryError, "the query is empty"),
        (Query(text="a", k=0), QueryError, "k must be between 1 and 1000, got 0"),
        (Query(text="a", rerank_k=5000), QueryError, "rerank_k must be between 1 and 1000"),
        (Query(text="a", kind="video"), QueryError, "unknown kind 'video'"),
        (Query(image=b"not an image", image_name="notes.txt"), QueryError,
         r"^cannot use query image notes.txt: not an image \(cannot identify format\)$"),
        (Query(image=b"\0" * 10_001), TooLargeError, "the uploaded image is 0.0 MiB, over this server's cap"),
        (Query(image=huge_header_png()), TooLargeError, "is 20000 x 20000, over this server's pixel cap of 1000000"),
        (Query(image=write_png(1200, 1000)), TooLargeError, "is 1200 x 1000, over this server's pixel cap"),
        (Query(image_id=10**9), NotInIndexError, "no image with id 1000000000"),
        (Query(image_path="/etc/passwd"), NotInIndexError, "/etc/passwd is not an indexed image"),
        (Query(image_path=str(tmp_path / "captions.txt")), NotInIndexError, "not an indexed image"),  # a text row's path
    ]
    for query, error, message in cases:
        with pytest.raises(error, match=message):
            service.search(query)


def test_without_a_lower_cap_the_decoders_own_refuses_as_it_does_in_process(index):
    with pytest.raises(QueryError, match=r"^cannot use query image big.png: image is 20000 x 20000, over the pixel cap "
                                         r"of 100000000; raise --max-pixels to allow it$"):
        SearchService(index).search(Query(image=huge_header_png(), image_name="big.png"))


def write_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, "PNG")
    return out.getvalue()


def test_recall_only_queries_use_the_models_already_loaded(index, monkeypatch):
    import itm.retrieval.search

    loads = []
    real = itm.retrieval.search.load_item_encoder
    monkeypatch.setattr(itm.retrieval.search, "load_item_encoder", lambda *a, **k: loads.append(a) or real(*a, **k))
    service = SearchService(index)
    a = service.search(Query(text="a red square", k=5, rerank=False))
    b = service.search(Query(text="a red square", k=5))
    assert len(loads) == 1 and not a.reranked and b.reranked and not a.calibrated
    assert a.hits == Searcher(index, rerank=False).search(text="a red square", k=5)


def test_takes_each_newer_generation_and_keeps_the_last_good_one(index, image_folder, tiny_rerank_spec, tiny_encoder,
                                                                 tmp_path):
    service = SearchService(index)
    first = service.search(Query(text="x", k=100))
    assert service.search(Query(text="x", k=100, rerank=False)).generation == first.generation
    new = write_images(image_folder / "new", 2, seed=7)
    build_index(image_folder, index, tiny_rerank_spec, BuildOptions(workers=1))
    later = service.search(Query(text="x", k=100))
    assert later.generation == first.generation + 1 and len(later.hits) == len(first.hits) + 2
    recall_only = service.search(Query(text="x", k=100, rerank=False))  # recall only reads the new generation too
    assert recall_only.generation == later.generation and {h.id for h in recall_only.hits} == {h.id for h in later.hits}
    assert {str(p) for p in new} <= {h.path for h in later.hits}
    assert service.search(Query(image_path=str(new[0]), k=1, kind="image")).hits[0].path == str(new[0])

    # an index rebuilt in place with other weights: refused, and the service answers from the generation it has
    other = resolve_model("itm-tiny", checkpoint=tiny_encoder.save(tmp_path / "other.safetensors"))
    for p in index.iterdir():
        p.unlink()
    build_index(image_folder, index, other, BuildOptions(workers=1))
    after = service.search(Query(text="x", k=100))
    assert after.hits == later.hits and after.generation == later.generation
    assert "was built with itm-tiny/checkpoint" in service.refresh_error


def test_an_empty_index_is_served_until_it_has_items(tmp_path, tiny_rerank_spec):
    (tmp_path / "photos").mkdir()
    build_index(tmp_path / "photos", tmp_path / "idx", tiny_rerank_spec)
    service = SearchService(tmp_path / "idx")
    with pytest.raises(EmptyIndexError, match="is empty; add images with `itm-index build FOLDER`"):
        service.search(Query(text="a red square"))
    assert service.info()["counts"] == {"image": 0, "text": 0} and service.generation() is None
    write_images(tmp_path / "photos", 3)
    build_index(tmp_path / "photos", tmp_path / "idx", tiny_rerank_spec)
    assert len(service.search(Query(text="a red square")).hits) == 3


def test_concurrent_queries_get_what_one_at_a_time_gets(index, image_folder):
    service = SearchService(index)
    images = sorted(image_folder.rglob("*.png"))
    queries = [Query(text=f"a {c} square", k=4, rerank_k=6) for c in ("red", "green", "blue")] + \
              [Query(image=p.read_bytes(), k=3) for p in images[:3]] + [Query(image_id=2, k=2, rerank=False)]
    expected = [service.search(q).hits for q in queries]
    errors, results = [], []

    def client(n: int) -> None:
        try:
            for i in range(12):
                q = queries[(n + i) % len(queries)]
                results.append((q, service.search(q).hits))
        except Exception as e:  # noqa: BLE001 - every failure counts
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 72
    assert all(hits == expected[queries.index(q)] for q, hits in results)


def test_info_is_what_itm_index_info_shows(index):
    from itm.indexer.info import index_info
    from itm.indexer.store import Snapshot

    info = SearchService(index).info()
    assert info == index_info(Snapshot.open(index)) and info["counts"] == {"image": 12, "text": 4}
