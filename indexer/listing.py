"""A rebuild that changes nothing, told from the source's listing alone.

Each commit records, per source, a fingerprint of what its build saw: every file the scanner
listed (path, size, modification time), or the text file's size and time, and the options that
decide what is listed and used (exclusions, hidden files, the pixel cap, text columns, the image
suffixes this install reads). When a later `itm-index build` of that source, with no model
options, lists the same fingerprint, nothing can have changed: it says so from the manifest,
without reading the rows or importing NumPy and pyarrow. A source whose last build skipped
anything gets no fingerprint, so its skipped files are tried again on every build, as before.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from itm.common.options import BuildOptions
from itm.models.formats import IMAGE_EXTENSIONS

from .check import marked, quick_damage
from .manifest import Manifest, load_manifest
from .scan import is_text_corpus, scan_images


class Listing:
    """The running fingerprint of one build's view of its source."""

    def __init__(self, source: Path, options: BuildOptions):
        decides = {"source": os.fsdecode(source), "exclude": list(options.exclude),
                   "include_hidden": options.include_hidden, "max_pixels": options.max_pixels,
                   "text_column": options.text_column, "id_column": options.id_column,
                   "suffixes": sorted(IMAGE_EXTENSIONS)}
        self._hash = hashlib.sha256(json.dumps(decides, sort_keys=True).encode())

    def add(self, path: str, size: int, mtime_ns: int) -> None:
        name = os.fsencode(path)
        self._hash.update(len(name).to_bytes(4, "little") + name + size.to_bytes(8, "little")
                          + mtime_ns.to_bytes(8, "little", signed=True))

    def digest(self) -> str:
        return self._hash.hexdigest()


def record(listing: Listing, items: int) -> dict:
    """The manifest's entry for a source: its fingerprint and its live rows."""
    return {"sha256": listing.digest(), "items": items}


def unchanged(index_dir: Path, source: Path, options: BuildOptions) -> tuple[Manifest, int] | None:
    """(manifest, the source's rows) when the source lists as its last commit saw it; else None."""
    manifest, own = load_manifest(index_dir)
    entry = manifest.listings.get(os.fsdecode(source)) if manifest is not None and not manifest.staging else None
    if entry is None or not source.exists() or own or quick_damage(manifest, index_dir) or marked(index_dir):
        return None  # a damaged index needs a real build, which repairs it
    listing = Listing(source, options)
    if is_text_corpus(source):
        st = source.stat()
        listing.add(str(source), st.st_size, st.st_mtime_ns)
    else:
        problems: list[tuple[str, str]] = []
        for e in scan_images(source, exclude=options.exclude, include_hidden=options.include_hidden,
                             on_skip=lambda path, why: problems.append((path, why))):
            listing.add(e.path, e.size, e.mtime_ns)
        if problems:
            return None
    return (manifest, int(entry["items"])) if listing.digest() == entry["sha256"] else None
