"""What every request to itm-serve passes through: a check of the Host header, the access token beyond
loopback, a cap on the body, a bound on the queries inside the server at once, security headers on
the response, and every failure turned into {"error": "one line"} with a 4xx status when the request
is at fault (503 when the server is full, a 500 only for a bug, and never a traceback)."""
from __future__ import annotations

import hmac
import json
import logging
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from itm.common.errors import DecodeError, EmptyIndexError, ItmError, NotInIndexError, QueryError, TooLargeError

from .service import SearchService

STATUS = [(TooLargeError, 413), (QueryError, 400), (NotInIndexError, 404), (EmptyIndexError, 409),
          (DecodeError, 422), (ItmError, 503)]  # first match wins
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
log = logging.getLogger("itm.server")


class JSON(JSONResponse):
    """JSON in ASCII: a path's undecodable bytes (lone surrogates) become \\udcXX escapes, as itm-search --json
    writes them, instead of failing to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def add_error_handlers(app: FastAPI, service: SearchService) -> None:
    """Every failure as {"error": one line}: 4xx when the request is at fault, never a traceback."""

    @app.exception_handler(ItmError)
    def itm_error(request: Request, e: ItmError):
        status = next(code for cls, code in STATUS if isinstance(e, cls))
        body = {"error": str(e)}
        if isinstance(e, QueryError):  # a query the index refused: whether it has a reranker, as a hit list says
            body["has_reranker"] = service.has_reranker
        return JSON(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, e: RequestValidationError):
        return JSON({"error": _validation_message(e.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    def http_error(request: Request, e: HTTPException):
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        return JSON({"error": detail}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    def unexpected(request: Request, e: Exception):
        log.exception("error answering %s %s", request.method, request.url.path)
        return JSON({"error": f"internal error ({type(e).__name__}); the server's log has the details"},
                    status_code=500)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    """The first problem, as `where: what` (e.g. `k: Input should be a valid integer`)."""
    if not errors:
        return "malformed request"
    e = errors[0]
    where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
    if e.get("type") == "missing" and not where:
        return "the request has no body; send a JSON object"
    return f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "malformed request"))


DRAIN_LIMIT = 64 * 2**20  # a refused body up to this size is read and dropped before the 413 goes out


async def _drain(receive) -> None:
    """Read and drop the rest of a request's body."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413, whether or not it says its length up front."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = HTTPException(413, f"the request is over this server's cap of {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            if length.isdigit() and int(length) <= DRAIN_LIMIT:
                await _drain(receive)  # a client still sending when the socket closes would see a reset, not 413
            response = JSON({"error": too_large.detail}, status_code=413, headers={"connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited, send)


class HostCheck:
    """Answer only requests whose Host header names one of `allowed` ("*": any)."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, {h.strip("[]").lower() for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or "*" in self.allowed:
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
        if name not in self.allowed:
            response = JSON({"error": f"this server answers only requests for {', '.join(sorted(self.allowed))}, "
                                      f"not for {host or 'no host'}; start it with --host to serve others"},
                            status_code=421)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class SecurityHeaders:
    """Security headers on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + \
                    [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
            await send(message)

        await self.app(scope, receive, with_headers)


@dataclass
class Gate:
    """How many queries may be inside the server at once, how many are, and how many were turned away."""

    limit: int  # one answered (the models take one query at a time), the rest waiting their turn
    inside: int = 0  # read and written only on the event loop's thread: no lock needed
    shed: int = 0  # queries answered 503 since the server started


class Admission:
    """At most `gate.limit` queries inside the server at once. A query beyond that is answered 503 with Retry-After
    at once, instead of joining a queue that would slow every client; pages, images and the server's description
    are not counted."""

    QUERIES = ("/api/search",)  # and /api/search/upload
    RETRY_AFTER_S = "1"

    def __init__(self, app, gate: Gate):
        self.app, self.gate = app, gate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.QUERIES):
            return await self.app(scope, receive, send)
        gate = self.gate
        if gate.inside >= gate.limit:
            gate.shed += 1
            await _drain(receive)
            response = JSON({"error": f"this server has {gate.limit} queries in hand; try again in "
                                      f"{self.RETRY_AFTER_S} s"}, status_code=503,
                            headers={"retry-after": self.RETRY_AFTER_S})
            return await response(scope, receive, send)
        gate.inside += 1
        try:
            await self.app(scope, receive, send)
        finally:
            gate.inside -= 1


class TokenCheck:
    """Every request but the page's own files must carry the server's access token, as `Authorization: Bearer
    TOKEN` or as the cookie the page sets once it has asked for it; compared in constant time. A client that
    fails `failures` times within `window_s` seconds is answered 429 until its failures age out."""

    OPEN = ("/static/",)  # with "/" itself: the page, which asks for the token
    COOKIE = "itm_token"

    def __init__(self, app, token: str, failures: int = 5, window_s: float = 60.0):
        self.app, self.token = app, token.encode()
        self.failures, self.window_s = failures, window_s
        self.failed: dict[str, list[float]] = {}  # client address -> times of its recent failures

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/" or scope["path"].startswith(self.OPEN):
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("?",))[0]
        now = time.monotonic()
        recent = [t for t in self.failed.get(client, ()) if now - t < self.window_s]
        if len(recent) >= self.failures:
            retry = str(int(self.window_s - (now - recent[0])) + 1)
            return await self._refuse(scope, receive, send, 429, "too many wrong access tokens from this address; "
                                      f"try again in {retry} s", {"retry-after": retry})
        if hmac.compare_digest(self._given(scope), self.token):
            self.failed.pop(client, None)
            return await self.app(scope, receive, send)
        self.failed[client] = recent + [now]
        return await self._refuse(scope, receive, send, 401, "this itm server needs its access token: send "
                                  "Authorization: Bearer TOKEN (the page asks for it)",
                                  {"www-authenticate": 'Bearer realm="itm"'})

    def _given(self, scope) -> bytes:
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        for part in headers.get(b"cookie", b"").split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name == self.COOKIE.encode():
                return urllib.parse.unquote_to_bytes(value)
        return b""

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str, headers: dict[str, str]) -> None:
        await _drain(receive)
        await JSON({"error": message}, status_code=status, headers=headers)(scope, receive, send)
