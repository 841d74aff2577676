"""itm-serve: load an index's models once and answer over HTTP (JSON API and web page); itm-search uses it."""
from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path
from typing import Optional

import typer

from itm.common.cli import BACKEND_HELP, DEVICE_HELP, PRECISION_HELP, THREADS_HELP, printable, user_errors, warn
from itm.common.errors import ItmError
from itm.common.options import BACKEND, DEFAULT_PORT, DEVICE, PRECISION, SERVER_MAX_QUERIES
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
    max_queries: int = typer.Option(SERVER_MAX_QUERIES, min=1, help="Queries inside the server at once: one "
                                    "answered, the rest waiting; more are answered 503 with Retry-After at once."),
    token: Optional[str] = typer.Option(None, "--token", help="Access token every request must carry (the page "
                                        "asks for it once); needed with a --host other than loopback."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Read the access token from this file "
                                              "(keeps it out of the process list)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="With a --host other than loopback, serve without an "
                                 "access token: anyone who can reach the machine can search and fetch images."),
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
        secret = _token(token, token_file)
        if host not in LOOPBACK:
            if secret is None and not no_auth:
                raise ItmError(f"--host {host} lets anyone who can reach this machine in: give the server an access "
                               "token with --token-file PATH (or --token), or pass --no-auth to serve without one")
            who = "anyone who can reach this machine" + (" and has the token" if secret else "")
            warn(PROG, f"warning: listening on {host}: {who} can search the index and fetch every indexed image "
                       "and its path")
        sock = listen(host, port)
        limits = Limits(max_upload_bytes=int(max_upload_mb * MIB), max_queries=max_queries,
                        **({"max_pixels": max_pixels} if max_pixels else {}))
        service = SearchService(index, device=device, precision=precision, backend=backend, threads=threads,
                                limits=limits)

        def listening(url: str) -> None:
            counts = service.info()["counts"]
            typer.echo(printable(f"{PROG}: serving {service.index_dir} ({counts['image']} images, {counts['text']} "
                                 f"texts) at {url}/ ; Ctrl-C to stop"))

        run(service, sock, on_listening=listening, token=secret)


MIN_TOKEN = 16  # characters: a shorter token is one a client refused 5 times a minute could still guess


def _token(token: str | None, token_file: Path | None) -> str | None:
    """The access token given on the command line or in a file, or None; a short or empty one is refused."""
    if token is not None and token_file is not None:
        raise typer.BadParameter("give --token or --token-file, not both")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ItmError(f"cannot read the access token from {token_file}: {e}") from None
    if token is not None and len(token) < MIN_TOKEN:
        raise ItmError(f"the access token is {len(token)} characters; give one of at least {MIN_TOKEN} "
                       "(for example: python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return token


def _importable(module: str) -> bool:
    try:
        import_module(module)
    except ImportError:
        return False
    return True


def main() -> None:
    typer.run(serve)
