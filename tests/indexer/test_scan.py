import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from itm.common.errors import CorpusError
from itm.data.corpora import make_odd_files
from itm.indexer.scan import (
    TEXT_EXTENSIONS,
    FileEntry,
    TextItem,
    is_text_corpus,
    read_texts,
    scan_images,
)


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())


def scanned(root: Path, **kwargs) -> list[str]:
    return [e.path.relative_to(root.absolute()).as_posix() for e in scan_images(root, **kwargs)]


class Skips(list):
    def __call__(self, path: Path, reason: str) -> None:
        self.append((path, reason))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    touch(
        tmp_path,
        "b.jpg", "A.JPG", "notes.txt", "c.Png", "anim.gif",
        "sub/x.webp", "sub/deeper/y.tiff", "sub/readme.md",
        "raw/z.jpg", "raw/more/w.bmp",
        ".hidden.jpg", ".cache/h.png", "sub/.thumbs/t.jpg",
    )
    return tmp_path


# ------------------------------------------------------------------------ scanning


def test_recursive_sorted_images_only(tree):
    assert scanned(tree) == [
        "A.JPG", "anim.gif", "b.jpg", "c.Png",
        "raw/more/w.bmp", "raw/z.jpg",
        "sub/deeper/y.tiff", "sub/x.webp",
    ]


def test_file_entries_carry_size_and_mtime(tree):
    os.utime(tree / "b.jpg", ns=(1_000_000_000, 1_234_567_890_123))
    entry = next(e for e in scan_images(tree) if e.path.name == "b.jpg")
    assert entry == FileEntry(path=tree / "b.jpg", size=len(b"b.jpg"), mtime_ns=1_234_567_890_123)
    assert entry.path.is_absolute()


def test_relative_root_gives_absolute_paths(tree, monkeypatch):
    monkeypatch.chdir(tree)
    paths = [e.path for e in scan_images(Path("sub"))]
    assert paths == [tree / "sub/deeper/y.tiff", tree / "sub/x.webp"]


@pytest.mark.parametrize(
    ("patterns", "gone"),
    [
        (["*.gif"], {"anim.gif"}),
        (["raw/*"], {"raw/z.jpg", "raw/more/w.bmp"}),
        (["raw"], {"raw/z.jpg", "raw/more/w.bmp"}),
        (["raw/"], {"raw/z.jpg", "raw/more/w.bmp"}),
        (["deeper"], {"sub/deeper/y.tiff"}),
        (["sub/deeper/*.tiff", "*.JPG"], {"sub/deeper/y.tiff", "A.JPG"}),
        (["*.gif", "raw/*"], {"anim.gif", "raw/z.jpg", "raw/more/w.bmp"}),
    ],
)
def test_exclude_globs(tree, patterns, gone):
    everything = scanned(tree)
    assert scanned(tree, exclude=patterns) == [p for p in everything if p not in gone]


def test_hidden_files_and_folders(tree):
    hidden = {".cache/h.png", ".hidden.jpg", "sub/.thumbs/t.jpg"}
    with_hidden = scanned(tree, include_hidden=True)
    assert hidden <= set(with_hidden)
    assert [p for p in with_hidden if p not in hidden] == scanned(tree)
    assert with_hidden == sorted(with_hidden, key=lambda p: p.split("/"))


def test_hidden_root_is_still_scanned(tmp_path):
    touch(tmp_path, ".photos/a.jpg")
    assert [e.path.name for e in scan_images(tmp_path / ".photos")] == ["a.jpg"]


def test_symlinks_are_followed_without_loops_or_duplicates(tmp_path):
    touch(tmp_path, "real/a.jpg", "elsewhere/b.png")
    (tmp_path / "real/loop").symlink_to(tmp_path / "real")  # a folder containing itself
    (tmp_path / "real/up").symlink_to(tmp_path)  # back to the root
    (tmp_path / "real/link.jpg").symlink_to(tmp_path / "elsewhere/b.png")
    (tmp_path / "zlink").symlink_to(tmp_path / "elsewhere")  # same folder reached twice
    skips = Skips()
    assert scanned(tmp_path, on_skip=skips) == ["elsewhere/b.png", "real/a.jpg", "real/link.jpg"]
    assert skips == []


def test_symlinked_folder_outside_the_root_is_scanned(tmp_path):
    touch(tmp_path, "outside/o.jpg")
    (tmp_path / "root").mkdir()
    (tmp_path / "root/album").symlink_to(tmp_path / "outside")
    assert scanned(tmp_path / "root") == ["album/o.jpg"]


def test_broken_symlinks_and_link_loops_are_reported(tmp_path):
    touch(tmp_path, "a.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "self.jpg").symlink_to(tmp_path / "self.jpg")
    skips = Skips()
    assert scanned(tmp_path, on_skip=skips) == ["a.jpg"]
    assert skips == [(tmp_path / "gone.jpg", "broken symlink"), (tmp_path / "self.jpg", "symlink loop")]


def test_unreadable_folder_is_reported_and_skipped(tmp_path, monkeypatch):
    touch(tmp_path, "a.jpg", "locked/b.jpg", "z/c.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    skips = Skips()
    assert scanned(tmp_path, on_skip=skips) == ["a.jpg", "z/c.jpg"]
    assert skips == [(tmp_path / "locked", "permission denied")]


def test_special_file_with_an_image_name_is_reported(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    skips = Skips()
    assert scanned(tmp_path, on_skip=skips) == []
    assert skips == [(tmp_path / "pipe.jpg", "not a regular file")]


def test_odd_files_are_all_found(tmp_path):
    expected = make_odd_files(tmp_path)
    assert sorted(e.path.name for e in scan_images(tmp_path)) == sorted(expected)


def test_single_image_file_as_root(tree):
    assert [e.path for e in scan_images(tree / "sub/x.webp")] == [tree / "sub/x.webp"]


def test_bad_roots_raise_at_call_time(tree):
    with pytest.raises(CorpusError, match="no such file or folder"):
        scan_images(tree / "missing")
    with pytest.raises(CorpusError, match="not a folder or a supported file"):
        scan_images(tree / "sub/readme.md")


# --------------------------------------------------------------------------- texts


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def read(path: Path, **kwargs) -> tuple[list[tuple[str, str]], list[str]]:
    skips = Skips()
    items = read_texts(path, on_skip=skips, **kwargs)
    assert all(skipped_path == path for skipped_path, _ in skips)
    return [(i.text, i.source_id) for i in items], [reason for _, reason in skips]


def test_is_text_corpus(tmp_path):
    assert TEXT_EXTENSIONS == {".txt", ".jsonl", ".csv", ".parquet"}
    assert is_text_corpus(Path("captions.CSV"))
    assert is_text_corpus(Path("a/b.jsonl"))
    assert not is_text_corpus(Path("photo.jpg"))
    (tmp_path / "folder.txt").mkdir()
    assert not is_text_corpus(tmp_path / "folder.txt")


def test_txt_lines_bom_blanks_and_bad_bytes(tmp_path):
    path = write(tmp_path / "c.txt", b"\xef\xbb\xbfa dog\r\n\n  two cats  \n\xff\xfe bad\n   \nlast")
    items, skips = read(path)
    assert items == [("a dog", "1"), ("two cats", "3"), ("last", "6")]
    assert skips == ["line 4: not valid UTF-8"]


def test_txt_refuses_column_options(tmp_path):
    path = write(tmp_path / "c.txt", "x\n")
    with pytest.raises(CorpusError, match="--text-column"):
        read_texts(path, text_column="text")


def test_jsonl_records_and_bad_lines(tmp_path):
    lines = [
        json.dumps({"text": "a red cube", "id": 7}),
        "{not json",
        "[1, 2]",
        "",
        json.dumps({"text": 3, "id": 9}),
        json.dumps({"text": "   ", "id": 10}),
        json.dumps({"title": "no text here", "id": 11}),
        json.dumps({"text": " a blue ball ", "id": "b-2"}),
    ]
    path = write(tmp_path / "c.jsonl", "\ufeff" + "\n".join(lines) + "\n")
    items, skips = read(path)
    assert items == [("a red cube", "1"), ("a blue ball", "8")]
    assert skips == [
        "line 2: invalid JSON",
        "line 3: not a JSON object",
        "line 5: 'text' is not a string (int)",
        "line 6: empty 'text'",
        "line 7: no 'text' or 'caption' field",
    ]
    items, _ = read(path, id_column="id")
    assert items == [("a red cube", "7"), ("a blue ball", "b-2")]


def test_jsonl_caption_fallback_and_explicit_column(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"caption": "one"}\n{"caption": "two", "alt": "zwei"}\n')
    assert read(path)[0] == [("one", "1"), ("two", "2")]
    assert read(path, text_column="alt") == ([("zwei", "2")], ["line 1: no 'alt' field"])


def test_jsonl_column_missing_everywhere_raises_without_skips(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"id": 1, "body": "x"}\n{"id": 2, "title": "y"}\nbroken\n')
    skips = Skips()
    with pytest.raises(CorpusError) as info:
        read_texts(path, on_skip=skips)
    message = str(info.value)
    assert "no 'text' or 'caption' column" in message
    assert "columns found: id, body, title" in message and "--text-column" in message
    assert skips == []
    with pytest.raises(CorpusError, match="no 'key' column; columns found: id, body, title. Pass --id-column"):
        read_texts(path, text_column="body", id_column="key")


def test_empty_record_files_give_no_items(tmp_path):
    assert read_texts(write(tmp_path / "e.jsonl", "\n\n")) == []
    assert read_texts(write(tmp_path / "e.csv", "")) == []


def test_csv_header_quoting_and_line_numbers(tmp_path):
    content = (
        "\ufeffid,caption,extra\n"
        'p1,"a cat, sitting",x\n'
        'p2,"two\nlines",y\n'
        "p3,,z\n"
        "\n"
        "p4\n"
        "p5,a hat,w\n"
    )
    path = write(tmp_path / "c.csv", content)
    items, skips = read(path)
    assert items == [("a cat, sitting", "2"), ("two\nlines", "3"), ("a hat", "8")]
    assert skips == ["line 5: empty 'caption'", "line 7: no 'text' or 'caption' field"]
    assert read(path, id_column="id")[0] == [("a cat, sitting", "p1"), ("two\nlines", "p2"), ("a hat", "p5")]


def test_csv_missing_column_names_the_columns(tmp_path):
    path = write(tmp_path / "c.csv", "id,body\n1,hello\n")
    with pytest.raises(CorpusError, match="columns found: id, body. Pass --text-column NAME"):
        read_texts(path)
    assert read(path, text_column="body")[0] == [("hello", "2")]


def test_parquet(tmp_path):
    table = pa.table({"uid": [10, 11, 12], "text": ["first", None, "third"], "other": [1.0, 2.0, 3.0]})
    path = tmp_path / "c.parquet"
    pq.write_table(table, path)
    assert read(path) == ([("first", "1"), ("third", "3")], ["row 2: 'text' is null"])
    assert read(path, id_column="uid")[0] == [("first", "10"), ("third", "12")]
    with pytest.raises(CorpusError, match="columns found: uid, text, other. Pass --text-column"):
        read_texts(path, text_column="caption")
    with pytest.raises(CorpusError, match="no 'key' column; columns found: uid, text, other"):
        read_texts(path, id_column="key")


def test_parquet_non_string_column_is_skipped_per_row(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    assert read(path) == ([], ["row 1: 'text' is not a string (int)", "row 2: 'text' is not a string (int)"])


def test_unreadable_or_unsupported_text_files(tmp_path):
    with pytest.raises(CorpusError, match="unsupported text file type .tsv"):
        read_texts(write(tmp_path / "c.tsv", "a\tb\n"))
    with pytest.raises(CorpusError, match="no such file"):
        read_texts(tmp_path / "missing.jsonl")
    with pytest.raises(CorpusError, match="not a readable Parquet file"):
        read_texts(write(tmp_path / "bad.parquet", b"PAR1 definitely not parquet"))


def test_text_item_is_frozen():
    item = TextItem(text="a", source_id="1")
    with pytest.raises(AttributeError):
        item.text = "b"  # type: ignore[misc]
