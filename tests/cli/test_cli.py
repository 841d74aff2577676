"""The installed commands, run as a user runs them."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import write_images
from tests.fixtures_broken import make_odd_files


def run(cmd, *args, env=None):
    exe = shutil.which(cmd)
    modules = {"itm-index": "indexer.cli", "itm-search": "retrieval.cli", "itm-train": "retrieval.train_cli",
               "itm-eval": "retrieval.eval_cli"}
    argv = [exe] if exe else [sys.executable, "-c", f"import {modules[cmd]} as m; m.main()"]
    return subprocess.run(argv + [str(a) for a in args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def corpus(tmp_path):
    write_images(tmp_path / "photos", 6)
    make_odd_files(tmp_path / "photos" / "odd")
    (tmp_path / "caps.txt").write_text("a red square\na blue circle\n")
    return tmp_path


def test_build_search_info_round_trip(corpus):
    idx = corpus / "idx"
    r = run("itm-index", "build", corpus / "photos", "--index", idx, "--model", "itm-tiny", "--pretrained", "random", "-q")
    assert r.returncode == 0, r.stderr
    assert "skipping " in r.stderr and "empty.jpg: empty file" in r.stderr
    assert " added," in r.stdout and "skipped" in r.stdout
    r = run("itm-index", "build", corpus / "caps.txt", "-q", env={"ITM_INDEX": str(idx)})
    assert r.returncode == 0, r.stderr
    assert "2 added" in r.stdout

    r = run("itm-search", "a red square", "-k", "3", "--index", idx, "--json")
    assert r.returncode == 0, r.stderr
    hits = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(hits) == 3 and {"score", "recall_score", "match_logit", "path"} <= set(hits[0])
    assert "no reranker" in r.stderr  # said once
    assert r.stderr.count("no reranker") == 1

    r = run("itm-search", "a red square", "-k", "2", "--paths-only", "--index", idx)
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(os.path.isfile(p) for p in lines)

    query = sorted((corpus / "photos").glob("*.png"))[0]
    r = run("itm-search", "--image", query, "--kind", "text", "-k", "2", "--index", idx)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2 and "'a " in r.stdout

    r = run("itm-search", " ", "--index", idx)
    assert r.returncode == 1 and "query is empty" in r.stderr

    r = run("itm-index", "info", "--index", idx)
    assert r.returncode == 0, r.stderr
    assert "itm-tiny/random" in r.stdout and "Flat" in r.stdout and "empty.jpg: empty file" in r.stdout


def test_errors_are_one_line_and_exit_1(corpus):
    r = run("itm-search", "anything", "--index", corpus / "none")
    assert r.returncode == 1 and r.stderr.startswith("itm-search: error: no index at") and len(r.stderr.splitlines()) == 1
    r = run("itm-index", "build", corpus / "photos", "--index", corpus / "i2", "-q")  # default ViT-B-32, offline
    assert r.returncode == 1 and "cannot download weights ViT-B-32/laion2b_s34b_b79k" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("itm-search")
    assert r.returncode == 2  # usage error


def test_every_skip_gets_a_line_of_its_own_beside_the_progress_bar(corpus):
    idx = corpus / "idx"
    r = run("itm-index", "build", corpus / "photos", "--index", idx, "--model", "itm-tiny", "--pretrained", "random")
    assert r.returncode == 0, r.stderr
    recorded = json.loads(run("itm-index", "info", "--index", idx, "--json").stdout)["skipped"]
    assert any("huge_header.png" in s["path"] for s in recorded)  # the decompression bomb
    shown = [line.rsplit("\r", 1)[-1] for line in r.stderr.split("\n")]  # what a terminal leaves on each line
    for s in recorded:
        assert f"itm-index: skipping {s['path']}: {s['reason']}" in shown
