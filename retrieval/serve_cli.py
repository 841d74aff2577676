"""itm-serve: load an index's models once and answer over HTTP (JSON API and web page); itm-search uses it."""
from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path
from typing import Optional

import typer

from itm.common.cli import BACKEND_HELP, DEVICE_HELP, PRECISION_HELP, THREADS_HELP, printable, user_errors, warn
from itm.common.errors import ItmError
from itm.common.options import BACKEND, DEFAULT_PORT, DEVICE, PRECISION
from itm.common.paths import default_index_dir

PROG = "itm-serve"
NEEDS = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart"))  # module, package
MIB = 2**20


def serve(
    index: Optional[Path] = typer.Option(None, "--index", envvar="ITM_INDEX", help="Index directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback lets others in."),
    port: int = typer.Option(DEFAULT_PORT, min=0, max=65535, help="Port (0: any free one)."),
    device: str = typer.Option(DEVICE, help=DEVICE_HELP),
    precision: str = typer.Option(PRECISION, help=PRECISION_HELP),
    backend: str = typer.Option(BACKEND, help=BACKEND_HELP),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    max_upload_mb: float = typer.Option(32, min=0.01, help="Largest query image accepted, in MiB."),
    max_pixels: Optional[int] = typer.Option(None, min=1, help="Largest query image accepted, width x height "
                                   "(default: the builder's cap)."),
) -> None:
    """Serve the index at http://HOST:PORT/ (web page) and /api/... (JSON) until Ctrl-C."""
    with user_errors(PROG):
        missing = [package for module, package in NEEDS if not _importable(module)]
        if missing:
            raise ItmError(f"itm-serve needs {', '.join(missing)}; install them with: pip install 'itm[server]'")
        from .discovery import check_none_running
        from .server import LOOPBACK, listen
        from .server import serve as run
        from .service import Limits, SearchService

        check_none_running(index or default_index_dir(), os.getpid())  # before the models load
        if host not in LOOPBACK:
            warn(PROG, f"warning: listening on {host}: anyone who can reach this machine can search the index "
                       "and fetch its images")
        sock = listen(host, port)
        limits = Limits(max_upload_bytes=int(max_upload_mb * MIB), **({"max_pixels": max_pixels} if max_pixels else {}))
        service = SearchService(index, device=device, precision=precision, backend=backend, threads=threads,
                                limits=limits)

        def listening(url: str) -> None:
            counts = service.info()["counts"]
            typer.echo(printable(f"{PROG}: serving {service.index_dir} ({counts['image']} images, {counts['text']} "
                                 f"texts) at {url}/ ; Ctrl-C to stop"))

        run(service, sock, on_listening=listening)


def _importable(module: str) -> bool:
    try:
        import_module(module)
    except ImportError:
        return False
    return True


def main() -> None:
    typer.run(serve)
