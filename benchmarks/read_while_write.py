"""Readers searching in a loop while a writer commits generation after generation: the scenario, and its figures.

The writer adds, changes and deletes images and caption lines, building after each change (and
compacting when a build finds enough dead rows). One reader holds the snapshot it opened first
and keeps searching it after the writer has committed past it; another moves to the newest
generation after every query. Both rerank every candidate, so every segment of their snapshot is
read. Each reader records what its snapshot holds; afterwards each record must equal what the
writer committed in that generation: no half-written state, no lost file, no error.

Shared by tests/retrieval/test_read_while_write.py (a short run) and benchmarks/robustness.py.
"""
from __future__ import annotations

import os
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from itm.data.corpora import write_images
from itm.indexer.build import BuildOptions, build_index
from itm.indexer.manifest import read_manifest
from itm.models.registry import ModelSpec
from itm.retrieval.search import Searcher

WORDS = ("red", "green", "blue", "yellow", "round", "square", "small", "large")


@dataclass
class Figures:
    generations: int = 0  # committed while the readers ran
    compactions: int = 0  # of those, generations that compacted segments
    queries: int = 0  # answered by the readers
    snapshots: int = 0  # generations the readers moved to (each checked against what the writer committed)
    errors: list[str] = field(default_factory=list)  # anything a reader raised, or a snapshot that was not whole


def read_while_writing(root: Path, spec: ModelSpec, changes: int = 4, seed: int = 0) -> Figures:
    """Run the scenario in folder `root` with model `spec` (which should have a reranker)."""
    w = _Writer(root, spec, seed)
    w.build()
    figures = Figures()
    lock = threading.Lock()
    moved = threading.Event()  # the writer has committed past the holder's snapshot
    stop = threading.Event()
    first = w.generation
    searchers = [(Searcher(w.index), hold) for hold in (True, False)]  # both open generation `first`
    readers = [threading.Thread(target=_read, args=(w, s, hold, figures, lock, moved, stop), daemon=True)
               for s, hold in searchers]
    for r in readers:
        r.start()
    for step in range(changes):
        w.change(step)
        w.build()
        if w.generation >= first + 2:
            moved.set()
    moved.set()
    stop.set()
    for r in readers:
        r.join(timeout=120)
    figures.generations = w.generation - first
    figures.compactions = w.compactions
    for gen, content in w.seen_by_readers:
        if content != w.committed[gen]:
            figures.errors.append(f"generation {gen}: a reader saw {len(content)} items, the writer committed "
                                  f"{len(w.committed[gen])}")
    return figures


class _Writer:
    def __init__(self, root: Path, spec: ModelSpec, seed: int):
        self.spec, self.seed = spec, seed
        self.images, self.captions, self.index = root / "photos", root / "captions.txt", root / "idx"
        self.query_image = write_images(root / "query", 1, seed=seed + 1000)[0]
        write_images(self.images, 8, seed=seed)
        self.lines = [f"a {WORDS[i % 8]} {WORDS[(3 * i) % 8]} thing {i}" for i in range(8)]
        self.captions.write_text("\n".join(self.lines) + "\n")
        self.committed: dict[int, frozenset] = {}  # generation -> the image paths and texts it holds
        self.seen_by_readers: list[tuple[int, frozenset]] = []
        self.generation = 0
        self.compactions = 0
        self.indexed_images: list[bytes] = []
        self.indexed_lines: list[str] = []

    def change(self, step: int) -> None:
        """Add an image, rewrite one, delete one, and rewrite a caption line."""
        files = sorted(self.images.rglob("*.png"))
        write_images(self.images / f"new{step}", 1, seed=self.seed + 100 + step)
        write_images(self.images / "tmp", 1, seed=self.seed + 200 + step)[0].replace(files[0])
        files[-1].unlink()
        self.lines[step % len(self.lines)] = f"a {WORDS[step % 8]} changed thing {step}"
        self.captions.write_text("\n".join(self.lines) + "\n")

    def build(self) -> None:
        """Build the images, then the captions: two generations (or more, when a build compacts)."""
        indexed = {"images": self.indexed_images, "lines": self.indexed_lines}
        for source in (self.images, self.captions):
            before = self.generation
            build_index(source, self.index, self.spec, BuildOptions(batch_size=2, commit_every=2, workers=1, compact_at=0.1))
            self.generation = read_manifest(self.index).generation
            self.compactions += self.generation - before - 1  # a build commits once, and once more to compact
            if source == self.images:
                indexed["images"] = [os.fsencode(p) for p in self.images.rglob("*.png")]
            else:
                indexed["lines"] = list(self.lines)
            for gen in range(before + 1, self.generation + 1):
                self.committed[gen] = frozenset([*indexed["images"], *indexed["lines"]])
        self.indexed_images, self.indexed_lines = indexed["images"], indexed["lines"]


def _read(w: _Writer, s: Searcher, hold: bool, figures: Figures, lock: threading.Lock, moved: threading.Event,
          stop: threading.Event) -> None:
    try:
        _record(w, s, figures, lock)
        if hold:
            moved.wait()  # search a snapshot whose dead segments the writer has since deleted
        while not stop.is_set():
            for hits in (s.search(text="a red square thing", k=100, rerank_k=100),
                         s.search(image=w.query_image, kind="all", k=100, rerank_k=100)):
                content = _content(s)
                wrong = [h for h in hits if (os.fsencode(h.path) if h.kind == "image" else h.text) not in content]
                if wrong:
                    raise AssertionError(f"hit {wrong[0]} is not in generation {s.snapshot.manifest.generation}")
            with lock:
                figures.queries += 2
            if s.refresh():
                _record(w, s, figures, lock)
    except Exception:  # noqa: BLE001 - every failure is a figure
        with lock:
            figures.errors.append(traceback.format_exc(limit=4))


def _content(s: Searcher) -> frozenset:
    rows = s.snapshot.rows.select(["kind", "path", "text"]).to_pylist()
    return frozenset(r["path"] if r["kind"] == "image" else r["text"] for r in rows)


def _record(w: _Writer, s: Searcher, figures: Figures, lock: threading.Lock) -> None:
    with lock:
        w.seen_by_readers.append((s.snapshot.manifest.generation, _content(s)))
        figures.snapshots += 1
