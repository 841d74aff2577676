"""IVF indexes beyond memory: trained once, filled shard by shard, merged on disk, opened memory-mapped.

An IVF index's inverted lists (the codes of every vector, grouped by coarse centroid) are its
bulk; the coarse quantizer and the list offsets are small. faiss keeps the lists in a file of
their own (OnDiskInvertedLists) that a search memory-maps, so the index costs RAM only for the
lists a query probes, as the page cache holds them. Building one follows faiss's own recipe
(faiss/contrib/ondisk.py, demos/demo_ondisk_ivf.py):

1. train the index (coarse quantizer, and SQ/PQ codebooks) on a sample of the vectors;
2. add each shard of vectors to an empty copy of the trained index, written to its own file;
3. merge the shards' lists into one `.ivfdata` file beside the index (`merge_ondisk`).

`nprobe` (lists probed per query) is chosen here too: the smallest power of two whose recall@10
against exact search, on held-out queries (indexer/ann.py), reaches the recall target.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import faiss
import numpy as np

from itm.common.durable import fsync_dir, space_checked
from itm.common.errors import ItmError

from .ann import RECALL_SAMPLE, Embeddings, exact_neighbours, held_out_queries, recall_of

Blocks = Callable[[], Iterator[Embeddings]]  # the vectors in row order, one shard at a time (each call starts over)
TRAIN_PER_LIST = 50  # training vectors per coarse centroid (faiss warns below 39)
TRAIN_MIN = 10_000  # and at least this many, for the SQ/PQ codebooks
PLATEAU = 0.005  # recall@10 gained by doubling nprobe below which probing more is not worth it
SHARD_ROWS = 1 << 20  # vectors added per shard: 2 GiB of float32 at 512-d, the most a build holds at once
_IVF = re.compile(r"(?:^|,)IVF(\d+)")  # the IVF component of a factory string, e.g. "IVF1024_HNSW32,SQ8"
READ_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY  # the .ivfdata is found beside the index


@dataclass(frozen=True)
class OnDiskIvf:
    """An IVF index whose lists live in `ivfdata`, with the nprobe chosen for it and the recall it reached."""

    index: faiss.Index
    ivfdata: Path
    nprobe: int
    recall_at_10: float
    seconds: dict[str, float]  # train, add (shards written), merge, tune (recall measured, nprobe chosen)


def is_ivf(factory: str) -> bool:
    """True for factory strings that make an IVF index (those are built and searched on disk)."""
    return _IVF.search(factory) is not None


def nlist_of(factory: str) -> int:
    """The number of inverted lists an IVF factory string asks for ("IVF1024_HNSW32,SQ8" -> 1024)."""
    return int(_IVF.search(factory).group(1))


def train_size(factory: str, n: int) -> int:
    """How many of the n vectors to train `factory` on."""
    return min(n, max(TRAIN_PER_LIST * nlist_of(factory), TRAIN_MIN))


def build_on_disk(blocks: Blocks, sample: Embeddings, factory: str, index_path: Path, recall_target: float,
                  seed: int = 0) -> OnDiskIvf:
    """Train `factory` on `sample`, add every block of `blocks`, merge their lists into `<index_path>.ivfdata`.

    The index file itself is left for the caller to write (store.write_ann), after the lists are
    durable. `sample` is a random sample of the vectors (at least the index's nlist of them).
    """
    dim = sample.shape[1]
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ItmError(f"invalid FAISS factory string {factory!r}: {str(e).splitlines()[-1]}") from None
    nlist = faiss.extract_index_ivf(index).nlist
    if len(sample) < nlist:
        raise ItmError(f"FAISS index {factory!r} needs at least {nlist} vectors to train, the corpus has "
                       f"{len(sample)}; pass a smaller --faiss-factory or omit it")
    clock = [time.perf_counter()]
    seconds = {}

    def lap(name: str) -> None:
        clock.append(time.perf_counter())
        seconds[name] = clock[-1] - clock[-2]

    index.train(np.ascontiguousarray(sample, np.float32))
    lap("train")
    ivfdata = index_path.with_suffix(".ivfdata")
    try:
        with space_checked(ivfdata), tempfile.TemporaryDirectory(prefix=".shards-", dir=index_path.parent) as tmp:
            trained = Path(tmp) / "trained.faiss"
            faiss.write_index(index, str(trained))
            shards = _write_shards(blocks, trained, Path(tmp))
            lap("add")
            merged = faiss.read_index(str(trained))
            with quiet_stdout():  # faiss reports the file's growth on stdout, which is a command's output
                from faiss.contrib.ondisk import merge_ondisk

                merge_ondisk(merged, [str(s) for s in shards], str(ivfdata))
    except BaseException:
        ivfdata.unlink(missing_ok=True)  # a part of the lists: no manifest names it yet
        raise
    _fsync(ivfdata)
    fsync_dir(index_path.parent)
    lap("merge")
    queries = held_out_queries(sample[:RECALL_SAMPLE], blocks, seed)
    nprobe, recall = choose_nprobe(merged, queries, blocks, recall_target)
    lap("tune")
    return OnDiskIvf(merged, ivfdata, nprobe, recall, seconds)


def _write_shards(blocks: Blocks, trained: Path, folder: Path) -> list[Path]:
    """Each block added to a copy of the trained index (ids: positions in row order), written to a file."""
    shards, start = [], 0
    for i, block in enumerate(blocks()):
        shard = faiss.read_index(str(trained))
        shard.add_with_ids(np.ascontiguousarray(block, np.float32), np.arange(start, start + len(block)))
        start += len(block)
        shards.append(folder / f"shard-{i}.faiss")
        faiss.write_index(shard, str(shards[-1]))
        del shard  # one shard's codes in memory at a time
    return shards


def choose_nprobe(index: faiss.Index, queries: Embeddings, blocks: Blocks, target: float,
                  k: int = 10) -> tuple[int, float]:
    """The smallest power-of-two nprobe whose recall@k against exact search reaches `target`.

    A lossy code (SQ8, PQ) caps recall, maybe below the target: probing more lists then costs
    time and gains nothing. So doubling stops, too, once it gains less than PLATEAU, and the
    smaller nprobe is kept with the recall it reached, which `itm-index info` shows beside the target.
    """
    ivf = faiss.extract_index_ivf(index)
    truth = exact_neighbours(queries, blocks, k)
    nprobe, last = 1, None
    while True:
        ivf.nprobe = nprobe
        recall = recall_of(index, queries, truth)
        if recall >= target or nprobe >= ivf.nlist:
            return nprobe, recall
        if last is not None and recall - last[1] < PLATEAU:
            ivf.nprobe = last[0]
            return last
        last, nprobe = (nprobe, recall), min(2 * nprobe, ivf.nlist)


def open_on_disk(index_path: Path, nprobe: int) -> faiss.Index:
    """An on-disk IVF index with its lists memory-mapped from the `.ivfdata` beside it.

    The map holds the file open: a later commit that deletes it does not take it from this reader.
    """
    with quiet_stdout():  # faiss reports where it found the lists on stdout
        index = faiss.read_index(str(index_path), READ_FLAGS)
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index


@contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence what C++ code prints on file descriptor 1 (process-wide, for the call's few milliseconds)."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
