"""Format 2 -> 3 on disk: the image rows of an older index get the metadata a build now reads (indexer/metadata.py).

The manifest migrates in memory (indexer/manifest.py) and format 2's rows read with the metadata
columns null, so that queries work at once; filters on those columns match nothing until the
first writer to open the index (a build of any source, or a compaction) reads each image's
header and commits the rows again. The vectors and their order do not change, so the ANN
indexes are kept as they are. An image whose file changed since it was indexed is left for
its own build, which re-encodes it anyway.
"""
from __future__ import annotations

import os

import pyarrow as pa

from .commit import Writer
from .metadata import read_file_metadata


def unmigrated(rows: pa.Table) -> list[int]:
    """Positions of image rows without metadata (written by format 2)."""
    kinds, widths = rows.column("kind").to_pylist(), rows.column("width").to_pylist()
    return [i for i, (kind, width) in enumerate(zip(kinds, widths)) if kind == "image" and width is None]


def migrate_rows(writer: Writer) -> int:
    """Read the metadata of image rows that lack it and commit them (hold the writer's lock); rows filled."""
    todo = unmigrated(writer.rows)
    if not todo:
        return 0
    rows = writer.rows.to_pylist()
    filled = 0
    for i in todo:
        r = rows[i]
        try:
            st = os.stat(r["path"])
        except OSError:
            continue
        if (st.st_size, st.st_mtime_ns) != (r["size"], r["mtime_ns"]):
            continue
        meta = read_file_metadata(os.fsdecode(r["path"]))
        if meta["width"] is not None:
            r.update(meta)
            filled += 1
    if filled:
        table = pa.Table.from_pylist(rows, schema=writer.rows.schema)
        writer.commit(table, writer.skipped, next_id=writer.manifest.next_id, ann=writer.manifest.ann)
    return filled

