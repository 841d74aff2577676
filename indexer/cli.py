"""itm-index: build an index from a folder of images or a text file, and describe it."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from itm.common.cli import (
    BACKEND_HELP,
    DEVICE_HELP,
    PRECISION_HELP,
    THREADS_HELP,
    Progress,
    printable,
    user_errors,
    warn,
)
from itm.common.options import DEFAULT_MODEL, BuildOptions, RayOptions
from itm.common.paths import default_index_dir

PROG = "itm-index"
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Build and inspect itm indexes.")
NO_WAIT = "While another build or compaction writes the index, refuse at once instead of waiting for it."
IndexOpt = typer.Option(None, "--index", envvar="ITM_INDEX", help="Index directory (default: per-user data dir).")
D = BuildOptions  # the library's defaults are the commands' defaults


@app.command()
def build(
    source: Path = typer.Argument(..., help="Folder of images, or a .txt/.jsonl/.csv/.parquet file of texts."),
    index: Optional[Path] = IndexOpt,
    model: Optional[str] = typer.Option(None, help=f"Model name or bundle (default {DEFAULT_MODEL}, or the index's)."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip pretrained tag, or 'random'."),
    checkpoint: Optional[Path] = typer.Option(None, help="Local encoder checkpoint file."),
    reranker: Optional[str] = typer.Option(None, help="Fusion reranker whose rerank store to build: a checkpoint "
                                           "path, a URL, or hf-hub:ORG/NAME[@REVISION]."),
    batch_size: int = typer.Option(D.batch_size, min=1),
    workers: int = typer.Option(D.workers, min=0, help="Decoding threads (0: decode inline)."),
    device: str = typer.Option(D.device, help=DEVICE_HELP),
    precision: str = typer.Option(D.precision, help=PRECISION_HELP),
    backend: str = typer.Option(D.backend, help=BACKEND_HELP),
    threads: Optional[int] = typer.Option(D.threads, min=1, help=THREADS_HELP),
    exclude: List[str] = typer.Option([], help="Glob to leave out, relative to the folder (repeatable)."),
    include_hidden: bool = typer.Option(D.include_hidden, help="Also index dot-files and dot-folders."),
    max_pixels: int = typer.Option(D.max_pixels, help="Skip images with more pixels than this."),
    faiss_factory: Optional[str] = typer.Option(D.faiss_factory, help="FAISS factory string (default: by corpus size)."),
    recall_target: float = typer.Option(D.recall_target, min=0.0, max=1.0, help="Recall@10 against exact search "
                                        "that an IVF index's nprobe is chosen to reach."),
    text_column: Optional[str] = typer.Option(D.text_column, help="Text column of a jsonl/csv/parquet file."),
    id_column: Optional[str] = typer.Option(D.id_column, help="Id column of a jsonl/csv/parquet file."),
    store_dtype: Optional[str] = typer.Option(None, help="Rerank store of a new index: fp16 (default), or int8 "
                                              "with a scale per token (half the bytes)."),
    engine: str = typer.Option("local", help="local: this process encodes; ray: a Ray Data job does "
                               "(pip install 'itm[ray]')."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to run on (default: a local one started for "
                                              "the build)."),
    ray_actors: Optional[int] = typer.Option(None, min=1, help="Encoder actors (default: one per CPU, or per GPU "
                                             "with --device cuda)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    no_wait: bool = typer.Option(False, "--no-wait", help=NO_WAIT),
) -> None:
    """Embed SOURCE into the index; run again to pick up new, changed and deleted files."""
    t0 = time.perf_counter()
    progress = Progress(PROG, "embedding", enabled=not quiet)
    with user_errors(PROG), progress:
        if engine not in ("local", "ray"):
            raise typer.BadParameter(f"unknown engine {engine!r}; choose local or ray", param_hint="--engine")
        ray = RayOptions(address=ray_address, actors=ray_actors) if engine == "ray" else None
        opts = BuildOptions(batch_size=batch_size, workers=workers, device=device, precision=precision,
                            backend=backend, threads=threads, exclude=tuple(exclude), include_hidden=include_hidden,
                            max_pixels=max_pixels, faiss_factory=faiss_factory, recall_target=recall_target,
                            text_column=text_column, id_column=id_column, store_dtype=store_dtype, ray=ray,
                            wait=not no_wait)
        index_dir = index or default_index_dir()
        if not (model or pretrained or checkpoint or reranker or store_dtype):
            from .listing import unchanged  # neither NumPy nor pyarrow

            found = unchanged(index_dir, source.expanduser().resolve(), opts)
            if found is not None:
                manifest, items = found
                _summary(index_dir, 0, 0, 0, items, 0, 0, manifest.counts, time.perf_counter() - t0)
                return
        from itm.models.registry import resolve_model

        from .build import build_index  # torch and open_clip load only to export or run a model

        spec = resolve_model(model or DEFAULT_MODEL, pretrained, checkpoint, reranker) \
            if (model or pretrained or checkpoint or reranker) else None
        r = build_index(source, index_dir, spec, opts, on_skip=progress.skip, on_progress=progress.update)
    _summary(r.index_dir, r.added, r.updated, r.removed, r.unchanged, r.skipped, r.reused,
             {"image": r.images, "text": r.texts}, r.seconds)


def _summary(index_dir: Path, added: int, updated: int, removed: int, unchanged: int, skipped: int, reused: int,
             counts: dict[str, int], seconds: float) -> None:
    typer.echo(f"{printable(str(index_dir))}: {added} added, {updated} updated, {removed} removed, "
               f"{unchanged} unchanged, {skipped} skipped ({reused} reused by content hash); "
               f"{counts['image']} images, {counts['text']} texts in {seconds:.1f}s")


@app.command()
def check(index: Optional[Path] = IndexOpt) -> None:
    """Verify every file the index names (its size and sha256 as written); list what is missing or damaged."""
    with user_errors(PROG):
        from .check import check_index

        r = check_index(index or default_index_dir())
    how = "size and sha256" if r.hashed else "size and contents (an index from before digests were kept)"
    if not r.damaged:
        typer.echo(f"{printable(str(r.index_dir))}: ok, {r.files} files verified by {how}")
        return
    for name, why in r.damaged:
        typer.echo(f"damaged: {printable(str(r.index_dir / name))} {why}")
    warn(PROG, f"{len(r.damaged)} of {r.files} files damaged; `itm-index build SOURCE` repairs the index, encoding "
               "again only what the damaged files held (a search meanwhile says which file it cannot use)")
    raise typer.Exit(1)


@app.command()
def compact(index: Optional[Path] = IndexOpt,
            no_wait: bool = typer.Option(False, "--no-wait", help=NO_WAIT)) -> None:
    """Rewrite segments that hold dead rows (deleted or changed items) or few rows; searches are unchanged."""
    with user_errors(PROG):
        from .compact import compact_index

        r = compact_index(index, wait=not no_wait)
    typer.echo(f"{printable(str(r.index_dir))}: {r.dead_rows} dead rows dropped, {r.segments_before} segments -> "
               f"{r.segments_after} in {r.seconds:.1f}s")


@app.command()
def info(index: Optional[Path] = IndexOpt,
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Counts, model, FAISS index types, size on disk, and the files that were skipped."""
    from . import store
    from .info import index_info

    with user_errors(PROG):
        snap = store.Snapshot.open(index or default_index_dir())
    m = snap.manifest
    described = index_info(snap)
    disk, skipped = described["bytes_on_disk"], described["skipped"]
    if as_json:
        typer.echo(json.dumps(described, indent=1))
        return
    rr = m.reranker
    typer.echo(f"index       {printable(str(snap.index_dir))} (format {m.format}, generation {m.generation})")
    typer.echo(f"items       {m.counts['image']} images, {m.counts['text']} texts")
    typer.echo(f"model       {m.model.label}, {m.model.embed_dim}-d")
    if described["precision"]:  # the encoders' arithmetic, per item: a build may add items in another one
        typer.echo("precision   " + ", ".join(f"{p} ({n} items)" for p, n in described["precision"].items()))
    typer.echo("reranker    " + (f"{rr.sha256[:12]}, store {'x'.join(map(str, rr.image_shape))} "
                                 f"{rr.store_dtype or 'fp16'} per image"
                                 if rr else "none (recall only)"))
    card = described["reranker_card"]
    if card:  # what the reranker was trained on and how well it did (itm-train's model card)
        figures = ", ".join(f"{k} {v:.1f}" for k, v in list((card.get("evaluation") or {}).items())[:4]
                            if isinstance(v, (int, float)))
        typer.echo(f"trained     {card.get('data', {}).get('name', '?')}, {card.get('steps', '?')} steps"
                   + (f"; val {figures}" if figures else ""))
    for kind, a in m.ann.items():
        on_disk = f", on disk, nprobe {a.nprobe} for recall target {a.recall_target:.2f}" if a.ivfdata else ""
        typer.echo(f"faiss       {kind}: {a.factory}{on_disk}, {a.ntotal} vectors, "
                   f"recall@10 vs exact {a.recall_at_10:.3f}")
    typer.echo(f"on disk     {disk / 2**20:.1f} MiB")
    typer.echo(f"skipped     {len(skipped)}")
    for s in skipped:
        typer.echo(printable(f"  {s['path']}: {s['reason']}"))


def main() -> None:
    app(prog_name=PROG)
