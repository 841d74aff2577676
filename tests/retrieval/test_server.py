"""The HTTP API, over a real server on a loopback port: answers as the in-process Searcher does, sends only
indexed files, refuses every malformed request with one 4xx line, and holds to whole generations under load."""
import base64
import dataclasses
import http.client
import json
import os
import threading
import time

import pytest

from benchmarks.read_while_write import _Writer
from itm.data.corpora import huge_header_png
from itm.indexer.build import BuildOptions, build_index
from itm.retrieval.hits import Hit
from itm.retrieval.search import Searcher
from itm.retrieval.service import Limits, SearchService
from tests.conftest import write_images
from tests.serving import get, post_form, post_json, request, running

HIT_FIELDS = [f.name for f in dataclasses.fields(Hit)]
ODD = b"caf\xe9.png"  # a name that is not UTF-8 (Latin-1)


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_rerank_spec):
    root = tmp_path_factory.mktemp("corpus")
    write_images(root / "photos", 8)
    os.replace(write_images(root / "tmp", 1, seed=9)[0], os.fsencode(root / "photos") + b"/" + ODD)
    (root / "captions.txt").write_text("a red square\na green circle\na blue square\na yellow circle\n")
    build_index(root / "photos", root / "idx", tiny_rerank_spec, BuildOptions(workers=1))
    build_index(root / "captions.txt", root / "idx", tiny_rerank_spec, BuildOptions(workers=1))
    return root / "idx"


@pytest.fixture(scope="module")
def url(index):
    with running(SearchService(index, limits=Limits(max_upload_bytes=200_000))) as u:
        yield u


def hits(reply) -> list[Hit]:
    assert reply.status == 200, reply.body
    return [Hit(**{f: h[f] for f in HIT_FIELDS}) for h in reply.json()["hits"]]


def test_every_kind_of_query_answers_as_the_searcher_does(url, index):
    oracle = Searcher(index)
    photo = sorted((index.parent / "photos").glob("*.png"))[2]
    r = get(url, "/api/search?q=a+red+square&k=4&rerank_k=6")
    body = r.json()
    assert body["index"] == os.path.realpath(index) and body["generation"] == 2 and body["reranked"]
    assert set(body["timings"]) == {"encode_ms", "recall_ms", "rerank_ms", "total_ms"}
    assert hits(r) == oracle.search(text="a red square", k=4, rerank_k=6)
    assert list(body["hits"][0]) == HIT_FIELDS + ["thumbnail", "image"]  # itm-search --json's fields, then URLs
    assert body["hits"][0]["thumbnail"] == f"/api/images/{body['hits'][0]['id']}/thumbnail"

    assert hits(post_json(url, "/api/search", {"text": "a red square", "k": 4, "rerank_k": 6})) == \
        oracle.search(text="a red square", k=4, rerank_k=6)
    recall_only = Searcher(index, rerank=False).search(text="a red square", k=4)
    r = get(url, "/api/search?q=a+red+square&k=4&rerank=false")
    assert hits(r) == recall_only and not r.json()["reranked"]

    expected = oracle.search(image=photo, k=3)
    b64 = base64.b64encode(photo.read_bytes()).decode()
    assert hits(post_json(url, "/api/search", {"image_base64": b64, "k": 3})) == expected
    assert hits(post_form(url, "/api/search/upload", {"k": "3"}, {"image": ("x.png", photo.read_bytes())})) == expected
    texts = [h for h in expected if h.kind == "text"]
    assert all(h["thumbnail"] is None for h in post_json(url, "/api/search", {"image_base64": b64, "k": 3})
               .json()["hits"] if h["kind"] == "text") and texts
    image_hit = next(h for h in expected if h.kind == "image")
    assert hits(get(url, f"/api/search?image_id={image_hit.id}&k=2&kind=text")) == \
        oracle.search(image=image_hit.path, k=2, kind="text")
    assert hits(post_form(url, "/api/search/upload", {"k": "2", "kind": "text", "rerank": "false"},
                          {"image": ("x.png", photo.read_bytes())})) == \
        Searcher(index, rerank=False).search(image=photo, k=2, kind="text")


def test_a_name_that_is_not_utf8_is_written_as_itm_search_does_and_fetched_by_id(url, index):
    raw = os.fsencode(index.parent / "photos") + b"/" + ODD
    r = get(url, "/api/search?q=a+photo&k=20&kind=image")
    assert r.body.isascii() and b"caf\\udce9.png" in r.body  # JSON escapes, as itm-search --json writes them
    hit = next(h for h in r.json()["hits"] if os.fsencode(h["path"]) == raw)
    assert get(url, hit["image"]).body == open(raw, "rb").read()
    assert get(url, hit["thumbnail"]).headers["content-type"] == "image/jpeg"
    by_path = post_json(url, "/api/search", {"image_path": os.fsdecode(raw), "k": 1, "kind": "image"})
    assert hits(by_path)[0].id == hit["id"]  # a path with odd bytes, sent as JSON \udcXX escapes


def test_images_and_thumbnails(url, index):
    oracle = Searcher(index)
    hit = oracle.search(text="a square", k=1)[0]
    r = get(url, f"/api/images/{hit.id}")
    assert r.status == 200 and r.body == open(hit.path, "rb").read() and r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff" and "default-src 'self'" in \
        r.headers["content-security-policy"]
    t = get(url, f"/api/images/{hit.id}/thumbnail")
    assert t.status == 200 and t.body[:3] == b"\xff\xd8\xff"
    again = get(url, f"/api/images/{hit.id}/thumbnail", **{"if-none-match": t.headers["etag"]})
    assert again.status == 304 and again.body == b""


MALFORMED = [  # method, path, body, headers, status, message
    ("GET", "/api/search", None, {}, 400, "give one query: a text, an image, or an indexed image's id or path"),
    ("GET", "/api/search?q=a&k=abc", None, {}, 422, "k: Input should be a valid integer"),
    ("GET", "/api/search?q=a&k=0", None, {}, 400, "k must be between 1 and 1000, got 0"),
    ("GET", "/api/search?q=a&rerank_k=99999", None, {}, 400, "rerank_k must be between 1 and 1000"),
    ("GET", "/api/search?q=a&kind=video", None, {}, 400, "unknown kind 'video'"),
    ("GET", "/api/search?q=%20%20", None, {}, 400, "the query is empty"),
    ("GET", "/api/search?q=a&image_id=1", None, {}, 400, "give one query"),
    ("GET", "/api/search?q=a&rerank=maybe", None, {}, 422, "rerank: Input should be a valid boolean"),
    ("GET", "/api/search?image_id=99999", None, {}, 404, "there is no image with id 99999 in the index"),
    ("GET", "/api/search?image_path=/etc/passwd", None, {}, 404, "/etc/passwd is not an indexed image"),
    ("POST", "/api/search", b"{not json", {"content-type": "application/json"}, 422,
     "the request body is not valid JSON"),
    ("POST", "/api/search", b"[1, 2]", {"content-type": "application/json"}, 422, "Input should be a valid dictionary"),
    ("POST", "/api/search", b"", {"content-type": "application/json"}, 422, "the request has no body"),
    ("POST", "/api/search", b'{"text": 5}', {"content-type": "application/json"}, 422,
     "text: Input should be a valid string"),
    ("POST", "/api/search", b'{"text": "a", "k": "many"}', {"content-type": "application/json"}, 422, "k: Input"),
    ("POST", "/api/search", b'{"image_base64": "!!!"}', {"content-type": "application/json"}, 400,
     "image_base64 is not valid base64"),
    ("POST", "/api/search", json.dumps({"image_base64": base64.b64encode(b"hello").decode()}).encode(),
     {"content-type": "application/json"}, 400, "cannot use query image the uploaded image: not an image"),
    ("POST", "/api/search", json.dumps({"image_base64": base64.b64encode(huge_header_png()).decode(),
                                        "image_name": "big.png"}).encode(),
     {"content-type": "application/json"}, 400, "cannot use query image big.png: image is 20000 x 20000, over the "
     "pixel cap of 100000000"),
    ("POST", "/api/search", json.dumps({"image_base64": base64.b64encode(bytes(300_000)).decode()}).encode(),
     {"content-type": "application/json"}, 413, "the uploaded image is 0.3 MiB, over this server's cap of 0.2 MiB"),
    ("POST", "/api/search/upload", b"", {"content-type": "multipart/form-data; boundary=x"}, 422,
     "image: Field required"),
    ("POST", "/api/search/upload", b"k=3", {"content-type": "application/x-www-form-urlencoded"}, 422,
     "image: Field required"),
    ("POST", "/api/search", b"x" * 2_000_000, {"content-type": "application/json"}, 413,
     "the request is over this server's cap of"),
    ("GET", "/api/images/abc", None, {}, 422, "row_id: Input should be a valid integer"),
    ("GET", "/api/images/99999", None, {}, 404, "there is no image with id 99999 in the index"),
    ("GET", "/api/images/..%2F..%2F..%2Fetc%2Fpasswd", None, {}, 404, "Not Found"),
    ("GET", "/api/images/-1/thumbnail", None, {}, 404, "there is no image with id -1"),
    ("GET", "/static/../retrieval/server.py", None, {}, 404, "Not Found"),
    ("GET", "/static/%2e%2e/server.py", None, {}, 404, "Not Found"),
    ("GET", "/static/..%2fserver.py", None, {}, 404, "Not Found"),
    ("GET", "/nowhere", None, {}, 404, "Not Found"),
    ("DELETE", "/api/search", None, {}, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("method,path,body,headers,status,message", MALFORMED,
                         ids=[f"{m[0]} {m[1][:40]} {m[2][:20] if m[2] else ''}" for m in MALFORMED])
def test_a_malformed_request_gets_one_4xx_line(url, method, path, body, headers, status, message):
    r = request(url, method, path, body, headers)
    assert r.status == status, r.body
    reply = r.json()
    assert set(reply) <= {"error", "has_reranker"} and message in reply["error"]
    assert "\n" not in reply["error"] and "Traceback" not in reply["error"]


def test_an_upload_and_a_text_of_the_index_by_id(url, index):
    photos = sorted((index.parent / "photos").glob("*.png"))
    text_id = next(h.id for h in Searcher(index).search(image=photos[0], kind="text", k=1))
    for path in (f"/api/images/{text_id}", f"/api/search?image_id={text_id}"):
        r = get(url, path)
        assert r.status == 404 and f"no image with id {text_id}" in r.json()["error"]
    r = post_form(url, "/api/search/upload", {}, {"image": ("notes.txt", b"plain text")})
    assert r.status == 400 and r.json()["error"] == "cannot use query image notes.txt: not an image (cannot " \
        "identify format)"


def test_a_body_over_the_cap_is_refused_even_without_a_length(url):
    conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=60)
    try:
        conn.request("POST", "/api/search", body=iter([b"x" * 400_000] * 5), encode_chunked=True,
                     headers={"content-type": "application/json", "transfer-encoding": "chunked"})
        r = conn.getresponse()
        assert r.status == 413 and "over this server's cap" in json.loads(r.read())["error"]
    finally:
        conn.close()


def test_only_loopback_host_names_are_answered(url):
    r = get(url, "/api/health", host="evil.example:80")  # a name rebound to 127.0.0.1 by a web page
    assert r.status == 421 and "answers only requests for 127.0.0.1, ::1, localhost" in r.json()["error"]
    for host in ("localhost", "127.0.0.1:8765", "[::1]:8765", "LOCALHOST:1"):
        assert get(url, "/api/health", host=host).status == 200
    assert get(url, "/api/health", host="127.0.0.1.evil.example").status == 421


def test_page_openapi_info_and_health(url, index):
    from itm.indexer.info import index_info
    from itm.indexer.store import Snapshot

    page = get(url, "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b'src="/static/app.js"' in page.body and b"http" not in page.body.replace(b"http-equiv", b"")
    for name in ("app.js", "style.css"):
        assert get(url, f"/static/{name}").status == 200
    assert get(url, "/docs").status == 404  # Swagger UI would come from a CDN: the OpenAPI JSON is served instead
    spec = get(url, "/api/openapi.json").json()
    assert {"/api/search", "/api/search/upload", "/api/images/{row_id}", "/api/info"} <= set(spec["paths"])
    assert "SearchResponse" in spec["components"]["schemas"]
    assert get(url, "/api/info").json() == json.loads(json.dumps(index_info(Snapshot.open(index))))
    health = get(url, "/api/health").json()
    assert health["status"] == "ok" and health["generation"] == 2 and health["has_reranker"]


def test_generations_committed_under_load_are_taken_whole(tmp_path, tiny_rerank_spec):
    """Clients query without pause while builds commit (and compact): every answer holds only what the writer
    committed in the generation it names, nothing fails, and the server ends on the last generation."""
    w = _Writer(tmp_path, tiny_rerank_spec, seed=3)
    w.build()
    upload = base64.b64encode(w.query_image.read_bytes()).decode()
    answers, failures, stop = [], [], threading.Event()

    def client(n: int) -> None:
        while not stop.is_set():
            r = get(url, "/api/search?q=a+red+square+thing&k=100&rerank_k=100") if n % 2 else \
                post_json(url, "/api/search", {"image_base64": upload, "kind": "all", "k": 100, "rerank_k": 100})
            if r.status != 200:
                failures.append(r.body)
                continue
            body = r.json()
            answers.append((body["generation"], body["hits"]))
            image = next((h for h in body["hits"] if h["kind"] == "image"), None)
            if image and get(url, image["thumbnail"]).status not in (200, 404):  # 404: gone in a later generation
                failures.append(b"thumbnail")
            if n == 0 and get(url, "/api/info").status != 200:
                failures.append(b"info")

    with running(SearchService(w.index, limits=Limits(max_queries=4))) as url:  # all four clients admitted
        clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for c in clients:
            c.start()
        for step in range(3):
            w.change(step)
            w.build()
            time.sleep(0.2)
        time.sleep(0.5)
        stop.set()
        for c in clients:
            c.join()
        final = get(url, "/api/search?q=x&k=1").json()["generation"]
    assert failures == [] and len(answers) > 20
    assert final == w.generation and len({g for g, _ in answers}) >= 3
    for generation, got in answers:
        content = {os.fsencode(h["path"]) if h["kind"] == "image" else h["text"] for h in got}
        assert content <= w.committed[generation], f"generation {generation} answered with what it did not hold"


def test_weighted_parts_filters_and_the_probability_cut_answer_as_the_searcher_does(url, index):
    from itm.retrieval.query import Filters, Part, Refine

    oracle = Searcher(index)
    photos = sorted((index.parent / "photos").glob("*.png"))
    parts = [Part(2.0, "a green circle"), Part(-1.0, "a blue square"), Part(0.5, image=str(photos[1]))]
    f, refine = Filters(path="*/photos/img*"), Refine(min_prob=0.3, sort="path")
    expected = oracle.search("a red square", k=3, parts=parts, filters=f, refine=refine)
    body = {"text": "a red square", "k": 3, "min_prob": 0.3, "sort": "path", "filters": {"path": "*/photos/img*"},
            "parts": [{"weight": 2, "text": "a green circle"}, {"weight": -1, "text": "a blue square"},
                      {"weight": 0.5, "image_base64": base64.b64encode(photos[1].read_bytes()).decode()}]}
    r = post_json(url, "/api/search", body)
    assert hits(r) == expected and r.json()["calibrated"] is False and r.json()["unmigrated"] == 0
    row_id = next(h.id for h in oracle.search(image=photos[1], kind="image", k=1))
    body["parts"][2] = {"weight": 0.5, "image_id": row_id}  # an indexed image, by id
    assert hits(post_json(url, "/api/search", body)) == expected
    got = get(url, "/api/search?q=a+red+square&k=3&add=2:a+green+circle&sub=a+blue+square&path=*/photos/img*"
                   "&min_prob=0.3&sort=path")
    assert hits(got) == oracle.search("a red square", k=3, parts=parts[:2], filters=f, refine=refine)
    for bad in ({"filters": {"colour": "red"}}, {"min_prob": 2}, {"sort": "size"}, {"parts": [{"weight": 1}]}):
        r = post_json(url, "/api/search", {"text": "a red square", **bad})
        assert r.status in (400, 422) and "error" in r.json(), bad
