"""itm-search: text -> images, or image -> texts and similar images."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer

from indexer.cliutil import printable, user_errors, warn, write_raw_path
from indexer.options import BACKEND, BACKENDS, DEVICE, PRECISION, PRECISIONS

from .hits import Hit
from .settings import DEFAULT_K, DEFAULT_RERANK_K

PROG = "itm-search"
NO_RERANKER = "this index has no reranker; results are recall-only (build with a model that has one, e.g. --model demo)"


def search(
    query: Optional[str] = typer.Argument(None, help="Words to search images for."),
    image: Optional[Path] = typer.Option(None, "--image", help="Reverse lookup: texts (and images) like this image."),
    k: int = typer.Option(DEFAULT_K, "-k", min=1, help="Number of results (per kind)."),
    kind: Optional[str] = typer.Option(None, help="image, text or all (default: image for text, all for --image)."),
    rerank_k: int = typer.Option(DEFAULT_RERANK_K, min=1, help="Candidates the fusion model rescores."),
    no_rerank: bool = typer.Option(False, "--no-rerank", help="Recall only: rank by dual-encoder similarity."),
    index: Optional[Path] = typer.Option(None, "--index", envvar="ITM_INDEX", help="Index directory."),
    device: str = typer.Option(DEVICE, help="cpu, cuda, cuda:1, ..."),
    precision: str = typer.Option(PRECISION, help=f"{', '.join(PRECISIONS)} (fp16 on a GPU only)."),
    backend: str = typer.Option(BACKEND, help=f"{', '.join(BACKENDS)}: exported graphs in ONNX Runtime, or torch "
                                "(auto: onnx on a CPU in fp32)."),
    threads: Optional[int] = typer.Option(None, min=1, help="Threads of the model's forward pass (default: the cores "
                                          "this process may use)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per result, with both score parts "
                                 "(a path's bytes that are not UTF-8 appear as \\udcXX, as Python's os.fsdecode "
                                 "gives them)."),
    paths_only: bool = typer.Option(False, "--paths-only", help="Only image paths (their exact bytes) and texts, "
                                    "one per line."),
    server: Optional[str] = typer.Option(None, "--server", help="URL of a running itm-serve to ask (default: the "
                                         "one serving this index, when one runs; else the search runs here)."),
    no_server: bool = typer.Option(False, "--no-server", help="Search in this process even when a server runs."),
) -> None:
    """Search the index. Example: itm-search "a red circle left of a blue square" -k 5"""
    with user_errors(PROG):
        if query is None and image is None:
            raise typer.BadParameter("give a QUERY or --image PATH")
        from .client import search as ask_server  # neither torch nor faiss: a warm server answers in milliseconds

        reply = None if no_server else ask_server(index, server=server, text=query, image=image, k=k, kind=kind,
                                                  rerank_k=rerank_k, rerank=not no_rerank, device=device,
                                                  precision=precision)
        if reply is not None:
            if not no_rerank and not reply.has_reranker:
                warn(PROG, NO_RERANKER)
            reply.check()
            return _print(reply.hits, as_json, paths_only)
        from .search import Searcher  # torch and open_clip load only when a model must be exported or run

        searcher = Searcher(index, rerank=not no_rerank, device=device, precision=precision, backend=backend,
                            threads=threads)
        if not no_rerank and not searcher.has_reranker:
            warn(PROG, NO_RERANKER)
        hits = searcher.search(text=query, image=image, k=k, kind=kind, rerank_k=rerank_k)
    _print(hits, as_json, paths_only)


def _print(hits: list[Hit], as_json: bool, paths_only: bool) -> None:
    for h in hits:
        if as_json:
            typer.echo(json.dumps(dataclasses.asdict(h)))
        elif paths_only:
            write_raw_path(h.path) if h.kind == "image" else typer.echo(h.text)
        else:
            what = printable(h.path) if h.kind == "image" else f"{h.text!r}"
            typer.echo(f"{h.score:8.4f}  {h.kind:5}  {what}")


def main() -> None:
    typer.run(search)
