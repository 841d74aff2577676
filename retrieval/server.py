"""itm's HTTP server: a JSON search API, the index's description, indexed images and their thumbnails,
and the web page (static files in retrieval/static, package data), over one SearchService. FastAPI + uvicorn.

    GET  /                          the web page
    GET  /api/search?q=...          text query; or image_id=N / image_path=P (an indexed image);
                                    k, kind, rerank_k, rerank=false; add=/sub= (more texts, `2:cat` weights);
                                    path, date, camera, min_size, orientation (filters); min_prob, sort, dedup
    POST /api/search                the same as JSON, or an image as base64 (image_base64)
    POST /api/search/upload         an image file as multipart form data, with the same fields
    GET  /api/images/{id}           an indexed image's file, exactly as indexed
    GET  /api/images/{id}/thumbnail a JPEG thumbnail of it
    GET  /api/info                  what `itm-index info --json` shows
    GET  /api/health                generation served, queries answered and turned away (503), why a newer
                                    generation was not taken
    GET  /api/openapi.json          the OpenAPI description

Every error is a JSON object {"error": "one line"} with a 4xx status when the request is at
fault; no traceback ever leaves the server. Hits carry the fields of `itm-search --json`; a path
whose bytes are not UTF-8 is written as os.fsdecode gives it (odd bytes as \\udcXX), so images
are fetched by row id, never by path.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Optional

import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi import Query as Param
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from itm.common.errors import ServerError
from itm.common.options import DEFAULT_K, DEFAULT_RERANK_K

from .discovery import ServerInfo, announce, withdraw
from .gallery import media_type
from .http_guards import JSON, Admission, BodyLimit, Gate, HostCheck, SecurityHeaders, TokenCheck, add_error_handlers
from .query import SORTS, Filters, Part, Query, Refine
from .service import Answer, SearchService

STATIC = Path(str(files(__package__) / "static"))  # package data: the page needs no build step
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class PartIn(BaseModel):
    """One more weighted part of a query: exactly one of text, image_base64, image_id."""

    weight: float = Field(1.0, description="Positive: more like this; negative: less like this.")
    text: Optional[str] = None
    image_base64: Optional[str] = Field(None, description="An image file, base64-encoded.")
    image_name: Optional[str] = Field(None, description="How messages name the uploaded image.")
    image_id: Optional[int] = Field(None, description="An indexed image, by row id.")


class FiltersIn(BaseModel):
    """Which items may be returned; every condition given must hold (see itm-search --help)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt filter must not silently filter nothing

    path: Optional[str] = Field(None, description="Glob on the whole path, e.g. */2024/*.")
    date_from: Optional[str] = Field(None, description="YYYY[-MM[-DD]], inclusive; capture date, else mtime.")
    date_to: Optional[str] = Field(None, description="YYYY[-MM[-DD]], inclusive.")
    camera: Optional[str] = Field(None, description="Words of the camera's make and model, any case.")
    min_width: Optional[int] = None
    min_height: Optional[int] = None
    orientation: Optional[str] = Field(None, description="landscape, portrait or square.")


class SearchRequest(BaseModel):
    """One query: at most one of text, image_base64, image_id, image_path, and any further weighted parts."""

    text: Optional[str] = Field(None, description="Words to search for.")
    image_base64: Optional[str] = Field(None, description="A query image file, base64-encoded.")
    image_name: Optional[str] = Field(None, description="How messages name the uploaded image.")
    image_id: Optional[int] = Field(None, description="An indexed image, by row id.")
    image_path: Optional[str] = Field(None, description="An indexed image, by path (as itm-search --json gives it).")
    k: int = Field(DEFAULT_K, description="Results per kind.")
    kind: Optional[str] = Field(None, description="image, text or all (default: image for text, all for an image).")
    rerank_k: int = Field(DEFAULT_RERANK_K, description="Candidates the fusion model rescores.")
    rerank: bool = Field(True, description="False: rank by dual-encoder similarity alone.")
    parts: list[PartIn] = Field([], description="More weighted texts and images.")
    filters: FiltersIn = Field(FiltersIn(), description="Applied before ranking: k matching hits when k exist.")
    min_prob: Optional[float] = Field(None, description="Keep hits whose calibrated probability of match is at "
                                      "least this (needs the reranker); none pass: no hits.")
    sort: str = Field("score", description=f"{', '.join(SORTS)} (date: newest first), after the cut.")
    dedup: Optional[float] = Field(None, description="Hide results whose embedding cosine with a better one is at "
                                   "least this (0.98 is itm-search --dedup's default).")


class HitOut(BaseModel):
    id: int
    kind: str
    score: float
    recall_score: float
    match_logit: Optional[float]
    path: str
    text: Optional[str]
    probability: Optional[float] = Field(None, description="Calibrated probability of match (reranked hits)")
    duplicates: int = Field(0, description="Near-duplicates of it that dedup hid")
    thumbnail: Optional[str] = Field(description="URL of the image's thumbnail (image hits)")
    image: Optional[str] = Field(description="URL of the image file (image hits)")


class SearchResponse(BaseModel):
    index: str = Field(description="Real path of the index answered from")
    generation: int = Field(description="Index generation the whole query read")
    has_reranker: bool = Field(description="Whether the index has a fusion reranker")
    reranked: bool = Field(description="Whether this query used it")
    hits: list[HitOut]
    timings: dict[str, float] = Field(description="encode_ms, recall_ms, rerank_ms, total_ms")
    calibrated: bool = Field(description="Whether probabilities come from a calibration fitted for the reranker "
                             "(else the plain sigmoid of the match logit)")
    unmigrated: int = Field(description="Images without metadata (an index of format 2 no build has migrated yet), "
                            "which metadata filters skip")


class ErrorOut(BaseModel):
    error: str = Field(description="What went wrong and what to do, in one line")
    has_reranker: Optional[bool] = Field(None, description="With a refused query: whether the index has a reranker")


ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 404, 409, 413, 421, 422, 429, 503)}  # 503: full, or an
# index the server cannot read; 401 and 429: the access token beyond loopback; 421: a Host it does not serve


def create_app(service: SearchService, *, allowed_hosts: tuple[str, ...] = LOOPBACK,
               token: str | None = None) -> FastAPI:
    """The ASGI app over `service`. Requests whose Host header is not in `allowed_hosts` are refused
    (a web page elsewhere cannot reach a loopback server by rebinding a name to 127.0.0.1); with `token`, every
    request but the page's own files must carry it (http_guards.TokenCheck)."""
    app = FastAPI(title="itm", summary="image<->text search over one itm index", version="1",
                  docs_url=None, redoc_url=None, openapi_url="/api/openapi.json", default_response_class=JSON)
    add_error_handlers(app, service)
    body_cap = service.limits.max_upload_bytes * 4 // 3 + 2**20  # base64 and form framing around the image
    gate = Gate(service.limits.max_queries)
    app.add_middleware(Admission, gate=gate)  # innermost: only admitted, authorised requests of a capped size count
    if token is not None:
        app.add_middleware(TokenCheck, token=token)
    app.add_middleware(BodyLimit, max_bytes=body_cap)
    app.add_middleware(HostCheck, allowed=allowed_hosts)
    app.add_middleware(SecurityHeaders)
    realpath = os.path.realpath(service.index_dir)

    def answer(query: Query) -> JSON:
        return JSON(_answer(service, query, realpath))

    @app.get("/api/search", response_model=SearchResponse, responses=ERRORS, summary="Search (text or indexed image)")
    def search_get(q: Optional[str] = Param(None, description="Words to search for."),
                   image_id: Optional[int] = Param(None, description="An indexed image, by row id."),
                   image_path: Optional[str] = Param(None, description="An indexed image, by path."),
                   k: int = DEFAULT_K, kind: Optional[str] = None, rerank_k: int = DEFAULT_RERANK_K,
                   rerank: bool = True, add: list[str] = Param([], description="More texts (`2:cat` weights)."),
                   sub: list[str] = Param([], description="Texts to be less like."),
                   path: Optional[str] = None, date: Optional[str] = Param(None, description="FROM..TO"),
                   camera: Optional[str] = None, min_size: Optional[str] = Param(None, description="WxH or N"),
                   orientation: Optional[str] = None, min_prob: Optional[float] = None, sort: str = "score",
                   dedup: Optional[float] = None):
        parts = (*(Part.parse(a) for a in add), *(Part.parse(x, -1.0) for x in sub))
        return answer(Query(text=q, image_id=image_id, image_path=image_path, k=k, kind=kind, rerank_k=rerank_k,
                            rerank=rerank, parts=parts, filters=Filters.parse(path, date, camera, min_size, orientation),
                            refine=Refine(min_prob, sort, dedup)))

    @app.post("/api/search", response_model=SearchResponse, responses=ERRORS, summary="Search (JSON body)")
    def search_post(req: SearchRequest):
        return answer(Query.from_json(req.model_dump()))

    @app.post("/api/search/upload", response_model=SearchResponse, responses=ERRORS,
              summary="Search with an uploaded image (multipart form)")
    def search_upload(image: UploadFile = File(..., description="The query image file."), k: int = Form(DEFAULT_K),
                      kind: Optional[str] = Form(None), rerank_k: int = Form(DEFAULT_RERANK_K),
                      rerank: bool = Form(True)):
        data = image.file.read(service.limits.max_upload_bytes + 1)
        return answer(Query(image=data, image_name=image.filename or None, k=k, kind=kind, rerank_k=rerank_k,
                            rerank=rerank))

    @app.get("/api/images/{row_id}", responses={200: {"content": {"image/*": {}}}, **ERRORS},
             summary="An indexed image's file")
    def image(row_id: int):
        found, data = service.image(row_id)
        name = os.path.basename(found.path).encode("ascii", "backslashreplace").decode().replace('"', "")
        return Response(data, media_type=media_type(data),
                        headers={"content-disposition": f'inline; filename="{name}"',
                                 "etag": f'"{found.hash}"', "cache-control": "private, max-age=60"})

    @app.get("/api/images/{row_id}/thumbnail", responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
             summary="A JPEG thumbnail of an indexed image")
    def thumbnail(row_id: int, request: Request):
        found, data = service.thumbnail(row_id)
        etag = f'"t-{found.hash}"'
        headers = {"etag": etag, "cache-control": "private, max-age=60"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/api/info", summary="What `itm-index info --json` shows")
    def info():
        return JSON(service.info())

    @app.get("/api/health", summary="Whether the server answers, and from which generation")
    def health():
        return JSON({"status": "ok", "index": realpath, "generation": service.generation(),
                     "queries": service.queries, "shed": gate.shed, "has_reranker": service.has_reranker,
                     "refresh_error": service.refresh_error, "device": service.device,
                     "precision": service.precision, "pid": os.getpid()})

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(service: SearchService, sock: socket.socket, on_listening: Callable[[str], None] | None = None,
          token: str | None = None) -> None:
    """Answer on `sock` (see `listen`) until Ctrl-C or SIGTERM; meanwhile itm-search finds this server for its index.

    >>> sock = listen("127.0.0.1", 8765)  # first, so that a port in use is found before the models load
    >>> serve(SearchService("idx/"), sock)
    """
    host = sock.getsockname()[0]
    url = f"http://{_url_host(host)}:{sock.getsockname()[1]}"
    hosts = LOOPBACK if host in LOOPBACK else ("*",)
    config = uvicorn.Config(create_app(service, allowed_hosts=hosts, token=token), log_level="warning",
                            access_log=False, lifespan="off", timeout_keep_alive=5)
    info = ServerInfo(url, os.getpid(), os.path.realpath(service.index_dir), service.device, service.precision,
                      service.limits.max_upload_bytes, token)
    # uvicorn stops gracefully on SIGINT/SIGTERM and then raises the signal again for the handler it found:
    # this one, so that the announcement is withdrawn and serve() returns instead of the process dying
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    def announce_started() -> None:
        announce(service.index_dir, info)
        if on_listening:
            on_listening(url)

    try:
        _Server(config, announce_started).run(sockets=[sock])
    except _Stopped:
        pass
    finally:
        withdraw(service.index_dir, os.getpid())
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Server(uvicorn.Server):
    """A uvicorn server that calls `on_started` once it listens with its own signal handlers in place, so that a
    client that finds the announcement can stop it at once without the signal landing in the middle of start-up."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]):
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()


class _Stopped(Exception):
    """SIGINT or SIGTERM, after uvicorn has shut down."""


def _stop(signum, frame) -> None:
    raise _Stopped


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise ServerError(f"cannot listen on {host}: {e}; pass --host 127.0.0.1") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another server running there? "
                          "Pass --port for another port") from None
    sock.set_inheritable(True)
    return sock


def _answer(service: SearchService, query: Query, realpath: str) -> dict[str, Any]:
    a: Answer = service.search(query)
    hits = []
    for h in a.hits:
        urls = {"thumbnail": f"/api/images/{h.id}/thumbnail", "image": f"/api/images/{h.id}"} \
            if h.kind == "image" else {"thumbnail": None, "image": None}
        hits.append({**asdict(h), **urls})
    return {"index": realpath, "generation": a.generation, "has_reranker": service.has_reranker,
            "reranked": a.reranked, "hits": hits, "timings": a.timings, "calibrated": a.calibrated,
            "unmigrated": a.unmigrated}


def _url_host(host: str) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host
