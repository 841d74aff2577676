"""itm-search: text -> images, or image -> texts and similar images."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import typer

from itm.common.cli import (
    BACKEND_HELP,
    DEVICE_HELP,
    PRECISION_HELP,
    THREADS_HELP,
    printable,
    user_errors,
    warn,
    write_raw_path,
)
from itm.common.options import BACKEND, DEFAULT_K, DEFAULT_RERANK_K, DEVICE, PRECISION

from .hits import Hit
from .query import DEFAULT_DEDUP, ORIENTATIONS, SORTS, Filters, Part, Query, Refine

PROG = "itm-search"
NO_RERANKER = "this index has no reranker; results are recall-only (build with a model that has one, e.g. --model demo)"
UNCALIBRATED = ("the reranker has no calibration fitted for it: probabilities are the plain sigmoid of its match logit "
                "(fit one with `itm-calibrate --model MODEL`)")
UNMIGRATED = ("{n} images of this index were indexed before their dimensions and EXIF were stored, and filters on "
              "them skip those images; `itm-index build FOLDER` or `itm-index compact` reads them")
WEIGHTS = "Prefix WEIGHT: to weigh it (2:snow); repeatable."


def search(
    query: Optional[str] = typer.Argument(None, help="Words to search images for (2:cat weighs them twice)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Reverse lookup: texts (and images) like this image."),
    add: List[str] = typer.Option([], "--add", help=f"More words the results should match. {WEIGHTS}"),
    sub: List[str] = typer.Option([], "--sub", help=f"Words the results should not match. {WEIGHTS}"),
    add_image: List[str] = typer.Option([], "--add-image", help=f"An image the results should be like. {WEIGHTS}"),
    sub_image: List[str] = typer.Option([], "--sub-image", help=f"An image the results should not be like. {WEIGHTS}"),
    k: int = typer.Option(DEFAULT_K, "-k", min=1, help="Number of results (per kind)."),
    kind: Optional[str] = typer.Option(None, help="image, text or all (default: image for text, all for --image)."),
    path: Optional[str] = typer.Option(None, "--path", help="Only paths matching this glob (*/2024/*, *.jpg)."),
    date: Optional[str] = typer.Option(None, "--date", help="Only items of these dates: 2024, 2024-03, "
                                       "2024-03-01..2024-06-30, 2024.. (capture date, else modification time)."),
    camera: Optional[str] = typer.Option(None, "--camera", help="Only images from a camera whose make and model hold "
                                         "these words (any case): canon, 'iphone 12'."),
    min_size: Optional[str] = typer.Option(None, "--min-size", help="Only images at least WIDTHxHEIGHT pixels "
                                           "(1920x1080), or N on both sides."),
    orientation: Optional[str] = typer.Option(None, "--orientation", help=f"Only {', '.join(ORIENTATIONS)} images."),
    min_prob: Optional[float] = typer.Option(None, "--min-prob", min=0.0, max=1.0, help="Only hits the reranker "
                                             "believes match, with this calibrated probability at least; none: "
                                             "says 'no match'."),
    sort: str = typer.Option("score", "--sort", help=f"{', '.join(SORTS)}: order of the results kept "
                             "(date: newest first)."),
    dedup: bool = typer.Option(False, "--dedup", help="Hide near-duplicate images, keeping the best of each group."),
    dedup_threshold: float = typer.Option(DEFAULT_DEDUP, help="Embedding cosine at or above which --dedup takes two "
                                          "results for near-duplicates."),
    rerank_k: int = typer.Option(DEFAULT_RERANK_K, min=1, help="Candidates the fusion model rescores."),
    no_rerank: bool = typer.Option(False, "--no-rerank", help="Recall only: rank by dual-encoder similarity."),
    index: Optional[Path] = typer.Option(None, "--index", envvar="ITM_INDEX", help="Index directory."),
    device: str = typer.Option(DEVICE, help=DEVICE_HELP),
    precision: str = typer.Option(PRECISION, help=PRECISION_HELP),
    backend: str = typer.Option(BACKEND, help=BACKEND_HELP),
    threads: Optional[int] = typer.Option(None, min=1, help=THREADS_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per result, with both score parts "
                                 "(a path's bytes that are not UTF-8 appear as \\udcXX, as Python's os.fsdecode "
                                 "gives them)."),
    paths_only: bool = typer.Option(False, "--paths-only", help="Only image paths (their exact bytes) and texts, "
                                    "one per line."),
    null: bool = typer.Option(False, "-0", "--null", help="As --paths-only, each path and text ended by a NUL byte "
                              "instead of a newline (for xargs -0: file names may hold newlines)."),
    server: Optional[str] = typer.Option(None, "--server", help="URL of a running itm-serve to ask (default: the "
                                         "one serving this index, when one runs; else the search runs here)."),
    no_server: bool = typer.Option(False, "--no-server", help="Search in this process even when a server runs."),
) -> None:
    """Search the index. Example: itm-search "a red circle left of a blue square" --sub "a star" -k 5 --min-prob 0.5"""
    with user_errors(PROG):
        if (query is None) == (image is None):
            raise typer.BadParameter("give a QUERY or --image PATH, not both (--add-image adds an image to words)")
        main = Part.parse(query) if query is not None else None
        parts = ([main] if main and main.weight != 1.0 else []) + [Part.parse(a) for a in add] + \
            [Part.parse(s, -1.0) for s in sub] + [Part.parse(a, image=True) for a in add_image] + \
            [Part.parse(s, -1.0, image=True) for s in sub_image]
        text = main.text if main and main.weight == 1.0 else None
        filters = Filters.parse(path, date, camera, min_size, orientation)
        refine = Refine(min_prob, sort, dedup_threshold if dedup else None)
        asked = Query(text, str(image) if image is not None else None, k=k, kind=kind, rerank_k=rerank_k,
                      rerank=not no_rerank, parts=tuple(parts), filters=filters, refine=refine).checked()
        from .client import search as ask_server  # neither torch nor faiss: a warm server answers in milliseconds

        reply = None if no_server else ask_server(index, asked, server=server, device=device, precision=precision)
        if reply is not None:
            if not no_rerank and not reply.has_reranker:
                warn(PROG, NO_RERANKER)
            reply.check()
            hits, calibrated, unmigrated = reply.hits, reply.calibrated, reply.unmigrated
        else:
            from .search import Searcher  # torch and open_clip load only when a model must be exported or run

            searcher = Searcher(index, rerank=not no_rerank, device=device, precision=precision, backend=backend,
                                threads=threads, quick_start=True)  # one query: start fast rather than run fast
            if not no_rerank and not searcher.has_reranker:
                warn(PROG, NO_RERANKER)
            hits = searcher.run(asked)
            calibrated = searcher.calibration.calibrated
            unmigrated = searcher.unmigrated() if filters.needs_metadata else 0
    _notes(hits, refine, filters, calibrated, unmigrated)
    _print(hits, as_json, b"\0" if null else b"\n" if paths_only else None, refine.min_prob is not None)


def _notes(hits: list[Hit], refine: Refine, filters: Filters, calibrated: bool, unmigrated: int) -> None:
    """What the user should know about the answer, one stderr line each."""
    if refine.min_prob is not None and not calibrated:
        warn(PROG, f"warning: {UNCALIBRATED}")
    if unmigrated:
        warn(PROG, f"warning: {UNMIGRATED.format(n=unmigrated)}")
    if refine.dedup is not None:
        hidden = sum(h.duplicates for h in hits)
        warn(PROG, f"{hidden} near-duplicate{'s' * (hidden != 1)} hidden (embedding cosine >= {refine.dedup:g})")
    if not hits and (refine.min_prob is not None or filters.active):
        why = [f"probability of match >= {refine.min_prob:g}"] * (refine.min_prob is not None) + \
            ["the filters"] * filters.active
        warn(PROG, f"no match: nothing passes {' and '.join(why)}")


def _print(hits: list[Hit], as_json: bool, end: bytes | None, with_probability: bool) -> None:
    """One entry per hit; `end`: paths (exact bytes) and texts only, each followed by it."""
    for h in hits:
        if as_json:
            typer.echo(json.dumps(dataclasses.asdict(h)))
        elif end is not None:
            write_raw_path(h.path, end) if h.kind == "image" else write_raw_path(h.text, end)
        else:
            what = printable(h.path) if h.kind == "image" else f"{h.text!r}"
            p = f"  p={h.probability:.2f}" if with_probability and h.probability is not None else ""
            dups = f"  (+{h.duplicates} near-duplicate{'s' * (h.duplicates != 1)})" if h.duplicates else ""
            typer.echo(f"{h.score:8.4f}  {h.kind:5}{p}  {what}{dups}")


def main() -> None:
    typer.run(search)
