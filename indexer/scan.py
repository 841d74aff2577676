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
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from itm.common.errors import CorpusError
from itm.models.formats import IMAGE_EXTENSIONS

__all__ = [
    "TABLE_EXTENSIONS",
    "TEXT_EXTENSIONS",
    "FileEntry",
    "OnSkip",
    "Records",
    "TextItem",
    "is_text_corpus",
    "read_records",
    "read_texts",
    "scan_images",
]

OnSkip = Callable[[Path, str], None]

TABLE_EXTENSIONS: frozenset[str] = frozenset({".jsonl", ".csv", ".parquet"})
"""Lower-case suffixes, with the dot, of the record tables ``read_records`` reads."""

TEXT_EXTENSIONS: frozenset[str] = TABLE_EXTENSIONS | {".txt"}
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
    except OSError as exc:
        raise _unreadable(root, exc) from None


def _unreadable(path: Path, exc: OSError) -> CorpusError:
    """The error for a corpus file or folder that cannot be opened at all."""
    if isinstance(exc, FileNotFoundError):
        return CorpusError(f"{path}: no such file or folder")
    if isinstance(exc, PermissionError):
        return CorpusError(f"{path}: permission denied")
    return CorpusError(f"{path}: cannot read ({exc.strerror or exc})")


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
    records = read_records(path, [*text_columns, *([id_column] if id_column else [])])
    return _records_to_items(path, records, text_columns, id_column, report)


@dataclass(frozen=True)
class Records:
    """The records of a ``.jsonl``, ``.csv`` or ``.parquet`` table, and the lines that hold none."""

    unit: str  # "line" or "row": what the numbers count (file lines; Parquet rows)
    columns: list[str] | None  # csv header, Parquet schema, or the keys met in jsonl records; None: nothing read
    good: list[tuple[int, dict[str, Any]]]  # (1-based number, record)
    bad: list[tuple[int, str]]  # (1-based number, why it holds no record)


def read_records(path: Path, columns: Sequence[str] | None = None) -> Records:
    """Read a ``.jsonl``, ``.csv`` or ``.parquet`` table (of Parquet, only ``columns`` when given).

    The one reader of record tables, for text corpora and training data alike. A line that
    holds no record (invalid JSON, not a JSON object, not UTF-8) comes back under ``bad`` with
    its reason; a file that cannot be opened or parsed at all raises ``CorpusError``.

        >>> [r["caption"] for _, r in read_records(Path("captions.jsonl")).good][:1]
        ['a dog on a beach']
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_records(path)
    if suffix == ".csv":
        return _csv_records(path)
    if suffix == ".parquet":
        return _parquet_records(path, columns)
    supported = ", ".join(sorted(TABLE_EXTENSIONS))
    raise CorpusError(f"{path}: unsupported table file type {suffix or '(none)'}; use {supported}")


def _open_binary(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _decoded_lines(path: Path, errors: str = "strict") -> Iterator[tuple[int, str | None]]:
    """(1-based line number, text, or None when the line is not valid UTF-8 and errors is "strict")."""
    with _open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield number, raw.decode("utf-8", errors)
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


def _jsonl_records(path: Path) -> Records:
    good: list[tuple[int, dict[str, Any]]] = []
    bad: list[tuple[int, str]] = []
    keys: dict[str, None] = {}  # insertion-ordered set of the keys met
    for number, line in _decoded_lines(path):
        if line is None:
            bad.append((number, "not valid UTF-8"))
        elif line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.append((number, "invalid JSON"))
                continue
            if isinstance(obj, dict):
                good.append((number, obj))
                keys.update(dict.fromkeys(obj))
            else:
                bad.append((number, "not a JSON object"))
    return Records("line", list(keys) if good else None, good, bad)


def _csv_records(path: Path) -> Records:
    """Records keyed by the header row; numbered by the file line where each starts."""
    # each line is decoded on its own, undecodable bytes kept as surrogates, so that a record
    # with bad bytes is skipped with its own line number and the others are read
    lines = (line for _, line in _decoded_lines(path, errors="surrogateescape"))
    reader = csv.reader(lines)
    good: list[tuple[int, dict[str, Any]]] = []
    bad: list[tuple[int, str]] = []
    header: list[str] | None = None
    line_end = 0
    while True:
        try:
            row = next(reader, None)
        except csv.Error as exc:
            raise CorpusError(f"{path}: line {line_end + 1}: cannot parse CSV ({exc})") from None
        if row is None:
            break
        start, line_end = line_end + 1, reader.line_num
        if any(_has_surrogates(cell) for cell in row):
            if header is None:
                raise CorpusError(f"{path}: line {start}: the header is not valid UTF-8")
            bad.append((start, "not valid UTF-8"))
        elif header is None:
            header = row
        elif row:
            good.append((start, dict(zip(header, row))))
    return Records("line", header, good, bad)  # header None: an empty file, no columns to check


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parquet_records(path: Path, wanted: Sequence[str] | None) -> Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _open_binary(path).close()  # same messages as the other formats for missing/unreadable files
    try:
        parquet = pq.ParquetFile(path)
        columns = list(parquet.schema_arrow.names)
        batches = parquet.iter_batches(columns=[c for c in columns if wanted is None or c in wanted])
        good = list(enumerate(_pylist(batches), start=1))
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from None
    return Records("row", columns, good, [])


def _pylist(batches: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield from batch.to_pylist()


def _records_to_items(
    path: Path,
    records: Records,
    text_columns: Sequence[str],
    id_column: str | None,
    report: Callable[[str], None],
) -> list[TextItem]:
    """Validate records into items. Columns are checked before any skip is reported, so a
    wrong column name gives one error rather than a skip per record."""
    if records.columns is not None:
        _require_columns(path, records.columns, text_columns, id_column)
    items: list[TextItem] = []
    skipped = list(records.bad)
    for number, record in records.good:
        item, problem = _record_to_item(record, str(number), text_columns, id_column)
        if item is not None:
            items.append(item)
        else:
            skipped.append((number, problem))
    for number, reason in sorted(skipped):
        report(f"{records.unit} {number}: {reason}")
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
