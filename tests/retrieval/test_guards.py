"""Admission and access: a server full of queries turns the next away at once with 503 and Retry-After and is back
to normal right after; beyond loopback every request but the page carries the token, and guessing is slowed."""
import asyncio
import json

import pytest

from itm.indexer.build import BuildOptions, build_index
from itm.retrieval.http_guards import JSON, Admission, Gate
from itm.retrieval.service import SearchService
from tests.conftest import write_images
from tests.serving import get, running

TOKEN = "correct-horse-battery-staple-42"


async def _call(app, path: str, headers: dict[bytes, bytes] | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one request through an ASGI app."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list((headers or {}).items()),
             "client": ("10.0.0.7", 5000)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body or b"{}")


def test_a_full_server_turns_queries_away_at_once_and_recovers():
    async def scenario():
        release = asyncio.Event()

        async def slow(scope, receive, send):  # a query that holds its place until released
            if scope["path"].startswith("/api/search"):
                await release.wait()
            await JSON({"ok": True})(scope, receive, send)

        gate = Gate(limit=2)
        app = Admission(slow, gate)
        inside = [asyncio.create_task(_call(app, "/api/search")) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert gate.inside == 2
        status, headers, body = await asyncio.wait_for(_call(app, "/api/search/upload"), 1)
        assert status == 503 and headers["retry-after"] == "1" and "try again" in body["error"]
        assert (await asyncio.wait_for(_call(app, "/api/info"), 1))[0] == 200  # not a query: not counted
        release.set()
        assert [(await t)[0] for t in inside] == [200, 200]
        assert gate.inside == 0 and gate.shed == 1
        assert (await _call(app, "/api/search"))[0] == 200  # normal service right after

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_spec):
    root = tmp_path_factory.mktemp("guarded")
    write_images(root / "photos", 4)
    build_index(root / "photos", root / "idx", tiny_spec, BuildOptions(workers=0))
    return root / "idx"


@pytest.fixture
def url(index):
    """A server of its own for each test: wrong tokens sent by one test do not count against the next."""
    with running(SearchService(index), token=TOKEN) as u:
        yield u


@pytest.mark.parametrize("headers, status", [
    ({}, 401), ({"authorization": "Bearer not-the-token"}, 401), ({"authorization": f"Basic {TOKEN}"}, 401),
    ({"cookie": "itm_token=nope"}, 401), ({"authorization": f"Bearer {TOKEN}"}, 200),
    ({"cookie": f"theme=dark; itm_token={TOKEN}"}, 200),
])
def test_beyond_loopback_every_api_request_carries_the_token(url, headers, status):
    for path in ("/api/search?q=a+red+square&k=2", "/api/info", "/api/health", "/api/openapi.json"):
        r = get(url, path, **headers)
        assert r.status == status, (path, r.body)
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer") and "access token" in r.json()["error"]


def test_the_page_loads_without_the_token_and_images_need_it(url):
    assert get(url, "/").status == 200 and get(url, "/static/app.js").status == 200
    hit = get(url, "/api/search?q=a+red+square&k=1", authorization=f"Bearer {TOKEN}").json()["hits"][0]
    assert get(url, hit["thumbnail"]).status == 401
    assert get(url, hit["thumbnail"], cookie=f"itm_token={TOKEN}").status == 200


def test_wrong_tokens_are_rate_limited_per_client(url):
    assert [get(url, "/api/info", authorization="Bearer guess").status for _ in range(5)] == [401] * 5
    r = get(url, "/api/info", authorization=f"Bearer {TOKEN}")  # even the right token waits its turn now
    assert r.status == 429 and int(r.headers["retry-after"]) > 0
