"""Corpus discovery: image files under a folder, and texts from txt/jsonl/csv/parquet files.

Problems with single items (a broken symlink, an unreadable folder, a bad line) are
reported through ``on_skip(path, reason)`` and skipped; problems that make the whole
corpus unusable raise ``CorpusError``.
"""
from __future__ import annotations

import codecs
import csv
import errno
import fnmatch
import io
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from indexer.errors import CorpusError
from indexer.images import IMAGE_EXTENSIONS

__all__ = [
    "TEXT_EXTENSIONS",
    "FileEntry",
    "OnSkip",
    "TextItem",
    "is_text_corpus",
    "read_texts",
    "scan_images",
]

OnSkip = Callable[[Path, str], None]

TEXT_EXTENSIONS: frozenset[str] = frozenset({".txt", ".jsonl", ".csv", ".parquet"})
"""Lower-case suffixes, with the dot, of the text corpus formats ``read_texts`` reads."""

_DEFAULT_TEXT_COLUMNS = ("text", "caption")


@dataclass(frozen=True)
class FileEntry:
    """One image file found by ``scan_images``."""

    path: Path  # absolute, as reached under the root (symlinks not resolved)
    size: int  # bytes, of the file a symlink points to
    mtime_ns: int  # modification time, nanoseconds since the epoch


@dataclass(frozen=True)
class TextItem:
    """One text of a text corpus."""

    text: str  # stripped of surrounding whitespace, never empty
    source_id: str  # id column value, else the 1-based line (txt/jsonl/csv) or row (parquet)


# ---------------------------------------------------------------------------- images


def scan_images(
    root: Path,
    *,
    exclude: Sequence[str] = (),
    include_hidden: bool = False,
    on_skip: OnSkip | None = None,
) -> Iterator[FileEntry]:
    """Iterate over the image files under ``root``, recursively, sorted by path.

    ``exclude`` holds fnmatch globs tested against the path relative to ``root``
    (``raw/*``) and against each of its names (``*.gif``); an excluded folder is not
    entered. Dot-files and dot-folders are skipped unless ``include_hidden``. Symlinks
    are followed; a folder reached twice (a loop, or two links) is scanned once.
    A missing or unreadable ``root`` raises ``CorpusError`` at the call, not lazily.

        >>> for entry in scan_images(Path("photos"), exclude=["*.gif"]):
        ...     print(entry.path, entry.size)
    """
    root = Path(os.path.abspath(root))
    root_stat = _stat_root(root)
    if not stat.S_ISDIR(root_stat.st_mode):
        return iter([_single_file(root, root_stat)])
    entries = _list_dir(root, _ignore, is_root=True)  # raises now, not at the first next()
    patterns = [p.rstrip("/") or p for p in exclude]  # "raw/" means the folder raw
    report = _ignore if on_skip is None else on_skip
    return _walk(entries, {(root_stat.st_dev, root_stat.st_ino)}, patterns, include_hidden, report)


def _walk(
    root_entries: list[os.DirEntry[str]],
    visited: set[tuple[int, int]],
    patterns: Sequence[str],
    include_hidden: bool,
    report: OnSkip,
) -> Iterator[FileEntry]:
    """Depth-first over name-sorted entries, so the output is sorted by path components."""
    stack: list[tuple[Iterator[os.DirEntry[str]], str]] = [(iter(root_entries), "")]
    while stack:
        entries_left, rel_dir = stack[-1]
        entry = next(entries_left, None)
        if entry is None:
            stack.pop()
            continue
        rel = f"{rel_dir}{entry.name}"
        if (not include_hidden and entry.name.startswith(".")) or _excluded(rel, entry.name, patterns):
            continue
        if not _worth_stat(entry):
            continue
        path = Path(entry.path)
        try:
            st = entry.stat()  # follows symlinks
        except OSError as exc:
            report(path, _stat_failure(entry, exc))
            continue
        if stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) not in visited:  # symlink loops and duplicate links
                visited.add((st.st_dev, st.st_ino))
                stack.append((iter(_list_dir(path, report)), f"{rel}/"))
        elif _is_image_name(entry.name):
            if stat.S_ISREG(st.st_mode):
                yield FileEntry(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)
            else:
                report(path, "not a regular file")


def _worth_stat(entry: os.DirEntry[str]) -> bool:
    """False for ordinary non-image files, decided without a stat call where possible."""
    try:
        return entry.is_symlink() or _is_image_name(entry.name) or entry.is_dir()
    except OSError:
        return True  # let stat() report the problem


def _ignore(path: Path, reason: str) -> None:
    pass


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _stat_root(root: Path) -> os.stat_result:
    try:
        return root.stat()
    except FileNotFoundError:
        raise CorpusError(f"{root}: no such file or folder") from None
    except PermissionError:
        raise CorpusError(f"{root}: permission denied") from None
    except OSError as exc:
        raise CorpusError(f"{root}: cannot read ({exc.strerror or exc})") from None


def _single_file(path: Path, st: os.stat_result) -> FileEntry:
    if not _is_image_name(path.name):
        supported = ", ".join(sorted(IMAGE_EXTENSIONS | TEXT_EXTENSIONS))
        raise CorpusError(f"{path}: not a folder or a supported file ({supported})")
    if not stat.S_ISREG(st.st_mode):
        raise CorpusError(f"{path}: not a regular file")
    return FileEntry(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _list_dir(path: Path, report: OnSkip, *, is_root: bool = False) -> list[os.DirEntry[str]]:
    """The folder's entries sorted by name; [] (reported) when it cannot be read."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (
            f"cannot read folder ({exc.strerror or exc})"
        )
        if is_root:
            raise CorpusError(f"{path}: {reason}") from None
        report(path, reason)
        return []


def _excluded(rel: str, name: str, patterns: Sequence[str]) -> bool:
    # Ancestors were tested when their folders were entered, so the name and the
    # relative path cover every component.
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _stat_failure(entry: os.DirEntry[str], exc: OSError) -> str:
    if entry.is_symlink():
        if isinstance(exc, FileNotFoundError):
            return "broken symlink"
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"symlink cannot be followed ({exc.strerror or exc})"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot stat ({exc.strerror or exc})"


# ----------------------------------------------------------------------------- texts


def is_text_corpus(path: Path) -> bool:
    """True when ``path`` names a text corpus file (by suffix) rather than images."""
    return path.suffix.lower() in TEXT_EXTENSIONS and not path.is_dir()


def read_texts(
    path: Path,
    *,
    text_column: str | None = None,
    id_column: str | None = None,
    on_skip: OnSkip | None = None,
) -> list[TextItem]:
    """Read the texts of a ``.txt``, ``.jsonl``, ``.csv`` or ``.parquet`` file.

    ``.txt`` holds one text per line. The others hold records: the text comes from
    ``text_column`` (default ``text``, else ``caption``), the id from ``id_column``
    (default: the line number, or the row number for Parquet). Bad records are
    reported as ``on_skip(path, "line N: reason")`` and skipped.

        >>> [t.text for t in read_texts(Path("captions.txt"))][:2]
        ['a dog on a beach', 'two cats on a sofa']
    """
    suffix = path.suffix.lower()
    if suffix not in TEXT_EXTENSIONS:
        supported = ", ".join(sorted(TEXT_EXTENSIONS))
        raise CorpusError(f"{path}: unsupported text file type {suffix or '(none)'}; use {supported}")

    def report(reason: str) -> None:
        if on_skip is not None:
            on_skip(path, reason)

    if suffix == ".txt":
        if text_column or id_column:
            raise CorpusError(
                f"{path}: --text-column and --id-column apply to jsonl, csv and parquet files; "
                ".txt holds one text per line"
            )
        return _read_txt(path, report)
    text_columns = (text_column,) if text_column else _DEFAULT_TEXT_COLUMNS
    if suffix == ".jsonl":
        table = _jsonl_table(path)
    elif suffix == ".csv":
        table = _csv_table(path)
    else:
        table = _parquet_table(path, [*text_columns, *([id_column] if id_column else [])])
    return _table_to_items(path, table, text_columns, id_column, report)


@dataclass(frozen=True)
class _Table:
    unit: str  # "line" or "row": how skip reasons and default ids count records
    columns: list[str] | None  # known up front (csv header, parquet schema); None for jsonl
    records: Iterable[tuple[int, dict[str, Any] | None, str]]  # (number, record or None, why not)


def _open_binary(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CorpusError(f"{path}: no such file") from None
    except PermissionError:
        raise CorpusError(f"{path}: permission denied") from None
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(1-based line number, text, or None when the line is not valid UTF-8)."""
    with _open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None


def _read_txt(path: Path, report: Callable[[str], None]) -> list[TextItem]:
    items = []
    for number, line in _decoded_lines(path):
        if line is None:
            report(f"line {number}: not valid UTF-8")
        elif line.strip():
            items.append(TextItem(text=line.strip(), source_id=str(number)))
    return items


def _jsonl_table(path: Path) -> _Table:
    def records() -> Iterator[tuple[int, dict[str, Any] | None, str]]:
        for number, line in _decoded_lines(path):
            if line is None:
                yield number, None, "not valid UTF-8"
            elif line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    yield number, None, "invalid JSON"
                    continue
                yield (number, obj, "") if isinstance(obj, dict) else (number, None, "not a JSON object")

    return _Table("line", None, records())


def _csv_table(path: Path) -> _Table:
    """Records keyed by the header row; numbered by the file line where each starts."""
    with _open_binary(path) as f, io.TextIOWrapper(f, encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text)
        rows: list[tuple[int, dict[str, Any] | None, str]] = []
        header: list[str] | None = None
        line_end = 0
        while True:
            try:
                row = next(reader, None)
            except (csv.Error, UnicodeDecodeError) as exc:
                raise CorpusError(f"{path}: line {line_end + 1}: cannot parse CSV ({exc})") from None
            if row is None:
                break
            start, line_end = line_end + 1, reader.line_num
            if header is None:
                header = row
            elif row:
                rows.append((start, dict(zip(header, row)), ""))
    return _Table("line", header, rows)  # header None: an empty file, no columns to check


def _parquet_table(path: Path, wanted: Sequence[str]) -> _Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _open_binary(path).close()  # same messages as the other formats for missing/unreadable files
    try:
        parquet = pq.ParquetFile(path)
        columns = list(parquet.schema_arrow.names)
        batches = parquet.iter_batches(columns=[c for c in columns if c in wanted])
        rows = [(n, row, "") for n, row in enumerate(_pylist(batches), start=1)]
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from None
    return _Table("row", columns, rows)


def _pylist(batches: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield from batch.to_pylist()


def _table_to_items(
    path: Path,
    table: _Table,
    text_columns: Sequence[str],
    id_column: str | None,
    report: Callable[[str], None],
) -> list[TextItem]:
    """Validate records into items. Skips are reported only once the columns are known to
    exist, so a wrong column name gives one error rather than a skip per record."""
    if table.columns is not None:
        _require_columns(path, table.columns, text_columns, id_column)
    items: list[TextItem] = []
    skipped: list[str] = []
    seen: dict[str, None] = {}  # insertion-ordered set of keys met in jsonl records
    for number, record, problem in table.records:
        if record is not None:
            seen.update(dict.fromkeys(record))
            item, problem = _record_to_item(record, str(number), text_columns, id_column)
            if item is not None:
                items.append(item)
                continue
        skipped.append(f"{table.unit} {number}: {problem}")
    if table.columns is None and seen:
        _require_columns(path, list(seen), text_columns, id_column)
    for reason in skipped:
        report(reason)
    return items


def _record_to_item(
    record: dict[str, Any], number: str, text_columns: Sequence[str], id_column: str | None
) -> tuple[TextItem | None, str]:
    name = next((c for c in text_columns if c in record), None)
    if name is None:
        return None, "no " + " or ".join(repr(c) for c in text_columns) + " field"
    text = record[name]
    if text is None:
        return None, f"{name!r} is null"
    if not isinstance(text, str):
        return None, f"{name!r} is not a string ({type(text).__name__})"
    if not text.strip():
        return None, f"empty {name!r}"
    if id_column is None:
        return TextItem(text=text.strip(), source_id=number), ""
    source_id = record.get(id_column)
    if source_id is None or not str(source_id).strip():
        return None, f"missing {id_column!r}"
    return TextItem(text=text.strip(), source_id=str(source_id).strip()), ""


def _require_columns(
    path: Path, columns: Sequence[str], text_columns: Sequence[str], id_column: str | None
) -> None:
    listed = ", ".join(columns) if columns else "(none)"
    if not any(c in columns for c in text_columns):
        wanted = " or ".join(repr(c) for c in text_columns)
        raise CorpusError(f"{path}: no {wanted} column; columns found: {listed}. Pass --text-column NAME")
    if id_column is not None and id_column not in columns:
        raise CorpusError(f"{path}: no {id_column!r} column; columns found: {listed}. Pass --id-column NAME")
