"""What every request to itm-serve passes through: a check of the Host header, a cap on the body,
security headers on the response, and every failure turned into {"error": "one line"} with a 4xx
status when the request is at fault (a 500 only for a bug, and never a traceback)."""
from __future__ import annotations

import json
import logging
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
