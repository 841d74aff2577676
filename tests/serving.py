"""A real HTTP server on a free loopback port, in a thread of the test process, and a small HTTP client.

Shared by the server, page and load tests. The client is the standard library's, so that what
goes over the wire is exactly what the test wrote (multipart bodies included).
"""
from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import uvicorn

from itm.retrieval.server import create_app, listen
from itm.retrieval.service import SearchService


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@contextmanager
def running(service: SearchService, token: str | None = None) -> Iterator[str]:
    """Serve `service` on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(service, token=token), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the test server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Reply:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        try:
            conn.request(method, path, body=body, headers=headers or {})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) and closed before the whole body was sent: read what it said
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def get(url: str, path: str, **headers: str) -> Reply:
    return request(url, "GET", path, headers=headers)


def post_json(url: str, path: str, payload: Any) -> Reply:
    return request(url, "POST", path, json.dumps(payload).encode(), {"content-type": "application/json"})


def post_form(url: str, path: str, fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> Reply:
    """multipart/form-data: `files` maps a field name to (file name, bytes)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"content-type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return request(url, "POST", path, body, {"content-type": f"multipart/form-data; boundary={boundary}"})
