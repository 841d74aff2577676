"""Queries a running itm-serve: what itm-search does first, so that a query from the shell returns in a
fraction of a second instead of loading the models. Imports neither torch, open_clip nor faiss.

    >>> reply = search(None, Query("a red circle", k=3))   # None: no server runs for the default index
    >>> reply.hits[0].path if reply else "answer in-process"
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

from itm.common.errors import QueryError, ServerError
from itm.common.options import DEVICE, PRECISION, SERVER_MAX_K
from itm.common.paths import default_index_dir

from .discovery import find_server
from .hits import Hit
from .query import Query

TIMEOUT_S = 120  # a first query after a large commit may wait for the server to open the new generation
BUSY_TRIES, MAX_WAIT_S = 5, 2  # a server that answers 503 (full) is asked again after its Retry-After, so often
HIT_FIELDS = tuple(f.name for f in fields(Hit))


@dataclass(frozen=True)
class Reply:
    hits: list[Hit]
    has_reranker: bool  # whether the index has a fusion reranker
    index: str  # real path of the index the server answered from
    generation: int | None  # index generation the query read
    error: str | None = None  # why the index refused the query (the in-process search raises QueryError there)
    calibrated: bool = False  # whether the hits' probabilities come from a calibration fitted for the reranker
    unmigrated: int = 0  # images without metadata, which metadata filters skip (a format-2 index not yet migrated)

    def check(self) -> None:
        """Raise the refusal as the in-process search would; itm-search warns about a missing reranker first."""
        if self.error is not None:
            raise QueryError(self.error)


def search(index_dir: Path | str | None, query: Query, *, server: str | None = None, device: str = DEVICE,
           precision: str = PRECISION) -> Reply | None:
    """Ask the server at `server` (a URL), or else the one running for `index_dir` (default: the per-user
    index) if it runs its models as `device` and `precision` ask. None when the query is for in-process
    search: no server runs for the index, or it stopped, or the query is one a server does not take
    (k over its cap, an image file this process cannot read or that is over the server's size cap:
    the in-process search reports that with its usual message). A query the index refuses comes back as
    a Reply with `error` set (see Reply.check); other errors from the server raise QueryError or ServerError."""
    index = os.path.realpath(index_dir or default_index_dir())
    announced = server is None
    max_upload, token = None, os.environ.get("ITM_TOKEN")
    if announced:
        found = find_server(index)
        if found is None or found.index != index or (found.device, found.precision) != (device, precision):
            return None
        server, max_upload, token = found.url, found.max_upload_bytes, found.token
    if max(query.k, query.rerank_k) > SERVER_MAX_K:
        return None
    uploaded = _uploaded(query, max_upload)
    if uploaded is None:
        return None
    try:
        reply = _post_patiently(server, "/api/search", uploaded.to_json(), token)
    except _Refused as e:
        return Reply([], e.has_reranker, index, None, str(e))
    except ConnectionError as e:
        if announced:  # the server has stopped since it was announced
            return None
        raise ServerError(f"{e}; start one with `itm-serve`, or leave out --server") from None
    if reply["index"] != index and (announced or index_dir is not None):
        if announced:
            return None
        raise ServerError(f"the itm server at {server} serves the index at {reply['index']}, not {index}; "
                          "pass that --index, or leave out --server")
    return Reply([Hit(**{f: h[f] for f in HIT_FIELDS}) for h in reply["hits"]], bool(reply["has_reranker"]),
                 reply["index"], int(reply["generation"]), calibrated=bool(reply.get("calibrated")),
                 unmigrated=int(reply.get("unmigrated") or 0))


def _uploaded(query: Query, max_upload: int | None) -> Query | None:
    """The query with each image file's bytes in place of its path (messages name the path); None when it is
    for in-process search: a file unreadable here, or over the server's cap."""
    def upload(image: str | bytes | None, name: str | None) -> dict:
        if not isinstance(image, str):
            return {"image": image, "image_name": name}
        try:
            data = Path(image).read_bytes()
        except OSError:
            raise _InProcess from None
        if max_upload is not None and len(data) > max_upload:
            raise _InProcess
        return {"image": data, "image_name": image}

    try:
        parts = tuple(replace(p, **upload(p.image, p.image_name)) for p in query.parts)
        return replace(query, parts=parts, **upload(query.image, query.image_name))
    except _InProcess:
        return None


class _InProcess(Exception):
    """The query is one this process answers itself."""


def _post(url: str, path: str, body: dict, token: str | None = None) -> dict:
    """POST `body` as JSON; the decoded reply. ConnectionError when nothing answers at `url`."""
    import http.client  # here, not above: without a server, looking for one must cost next to nothing

    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServerError(f"--server {url} is not an http:// URL; pass one like http://127.0.0.1:8765")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=TIMEOUT_S)
    prefix = parts.path.rstrip("/")
    try:
        headers = {"content-type": "application/json", "accept": "application/json",
                   **({"authorization": f"Bearer {token}"} if token else {})}
        conn.request("POST", prefix + path, body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected) as e:
        raise ConnectionError(f"no itm server answers at {url} ({e.__class__.__name__})") from None
    except (OSError, http.client.HTTPException) as e:
        raise ServerError(f"the itm server at {url} did not answer ({e}); stop it, or pass --no-server") from None
    finally:
        conn.close()
    try:
        reply = json.loads(raw)
        if not isinstance(reply, dict) or (response.status == 200 and not {"index", "hits"} <= reply.keys()):
            raise ValueError
    except ValueError:
        raise ServerError(f"{url} answered with something that is not itm's JSON (HTTP {response.status}); "
                          "is it an itm server?") from None
    if response.status == 503 and response.getheader("retry-after", "").isdigit():
        raise _Busy(f"the itm server at {url} is busy ({reply.get('error')}); try again, or pass --no-server",
                    int(response.getheader("retry-after")))
    if response.status >= 500:
        raise ServerError(f"the itm server at {url} failed: {reply.get('error', response.status)}")
    if response.status == 401:
        raise ServerError(f"the itm server at {url} needs its access token; set ITM_TOKEN to it")
    if response.status != 200:
        message = str(reply.get("error", f"HTTP {response.status}"))
        raise _Refused(message, bool(reply["has_reranker"])) if "has_reranker" in reply else QueryError(message)
    return reply


class _Busy(ServerError):
    """The server turned the query away (503) for now: ask again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def _post_patiently(url: str, path: str, body: dict, token: str | None) -> dict:
    """_post, asking again while a busy server says when to (BUSY_TRIES times at most)."""
    for _ in range(BUSY_TRIES - 1):
        try:
            return _post(url, path, body, token)
        except _Busy as e:
            time.sleep(min(e.retry_after, MAX_WAIT_S))
    return _post(url, path, body, token)


class _Refused(QueryError):
    def __init__(self, message: str, has_reranker: bool):
        super().__init__(message)
        self.has_reranker = has_reranker
