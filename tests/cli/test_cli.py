"""The installed commands, run as a user runs them."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from itm.data.corpora import make_odd_files
from tests.conftest import write_images


def run(cmd, *args, env=None, text=True):
    """The command's result; with text=False its output stays bytes, as a pipe to another program gets it."""
    exe = shutil.which(cmd)
    modules = {"itm-index": "itm.indexer.cli", "itm-search": "itm.retrieval.cli", "itm-train": "itm.training.train_cli",
               "itm-eval": "itm.training.eval_cli", "itm-serve": "itm.retrieval.serve_cli"}
    argv = [exe] if exe else [sys.executable, "-c", f"import {modules[cmd]} as m; m.main()"]
    return subprocess.run(argv + [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args],
                          capture_output=True, text=text, timeout=300, env={**os.environ, **(env or {})})


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

    for p in sorted((corpus / "photos").glob("*.png"))[:2]:
        p.unlink()
    r = run("itm-index", "build", corpus / "photos", "--index", idx, "-q")
    assert r.returncode == 0 and "2 removed" in r.stdout, r.stderr
    r = run("itm-index", "compact", "--index", idx)
    assert r.returncode == 0 and "2 dead rows dropped, 2 segments -> 2" in r.stdout  # images and texts, one each, r.stderr


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


def test_a_name_that_is_not_utf8_survives_every_output(tmp_path):
    folder = tmp_path / "photos"
    write_images(folder, 3)
    raw = os.fsencode(folder) + b"/caf\xe9.png"  # Latin-1
    write_images(tmp_path / "x", 1, seed=5)[0].replace(os.fsdecode(raw))
    open(os.fsencode(folder) + b"/bad \x80.png", "wb").write(b"not an image")
    idx = tmp_path / "idx"
    r = run("itm-index", "build", folder, "--index", idx, "--model", "itm-tiny", "--pretrained", "random", "-q",
            text=False)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert b"bad \\x80.png: not an image" in r.stderr  # printed readably: the odd byte as \x80

    r = run("itm-search", "a photo", "-k", "4", "--paths-only", "--index", idx, text=False)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and raw in lines and all(os.path.isfile(p) for p in lines)  # what xargs would open
    r = run("itm-search", "a photo", "-k", "4", "--json", "--index", idx, text=False)
    assert raw in {os.fsencode(json.loads(line)["path"]) for line in r.stdout.splitlines()}  # exact, via \udcXX
    r = run("itm-search", "a photo", "-k", "4", "--index", idx, text=False)
    assert r.returncode == 0 and b"caf\\xe9.png" in r.stdout

    r = run("itm-index", "info", "--index", idx, text=False)
    assert r.returncode == 0 and b"bad \\x80.png: not an image" in r.stdout
    r = run("itm-index", "info", "--json", "--index", idx, text=False)
    skipped = json.loads(r.stdout)["skipped"]
    assert [os.fsencode(s["path"]) for s in skipped] == [os.fsencode(folder) + b"/bad \x80.png"]


def test_null_ended_paths_keep_names_with_newlines_whole(tmp_path):
    folder = tmp_path / "photos"
    write_images(folder, 2)
    odd = folder / "two\nlines.png"
    write_images(tmp_path / "x", 1, seed=5)[0].replace(odd)
    idx = tmp_path / "idx"
    r = run("itm-index", "build", folder, "--index", idx, "--model", "itm-tiny", "--pretrained", "random", "-q")
    assert r.returncode == 0, r.stderr
    r = run("itm-search", "a photo", "-k", "3", "-0", "--index", idx, text=False)
    assert r.returncode == 0 and r.stdout.endswith(b"\0"), r.stderr
    paths = r.stdout[:-1].split(b"\0")
    assert len(paths) == 3 and os.fsencode(odd) in paths and all(os.path.isfile(p) for p in paths)


# pandas: what pyarrow's to_numpy of strings imports; pyarrow.compute: 40-70 ms of a cold query's start
HEAVY = ("torch", "open_clip", "torchvision", "pandas", "pyarrow.compute")
PROBE = ("import atexit, sys\n"
         "atexit.register(lambda: print('loaded:', *[m for m in {heavy!r} if m in sys.modules], file=sys.stderr))\n"
         "import {module} as m\n"
         "m.main()")


def probe(cmd, *args, heavy=HEAVY):
    """The command, reporting which of `heavy` it imported."""
    module = {"itm-index": "itm.indexer.cli", "itm-search": "itm.retrieval.cli"}[cmd]
    r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=heavy, module=module), *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    loaded = [line for line in r.stderr.splitlines() if line.startswith("loaded:")]
    return r, loaded[-1].split()[1:]


def test_help_a_rebuild_with_nothing_to_do_and_queries_import_no_torch_nor_pandas(tmp_path):
    import torch

    from itm.models.fusion import FusionReranker, get_fusion_config
    from itm.models.fusion_checkpoint import save_reranker

    torch.manual_seed(0)
    reranker = save_reranker(FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval(),
                             tmp_path / "reranker.safetensors")
    images = write_images(tmp_path / "photos", 5)
    (tmp_path / "caps.txt").write_text("a red square\na blue circle\n")
    idx = tmp_path / "idx"
    for source, model in ((tmp_path / "photos", ["--model", "itm-tiny", "--pretrained", "random", "--reranker",
                                                 reranker]), (tmp_path / "caps.txt", [])):
        r = run("itm-index", "build", source, "--index", idx, "-q", *model)  # exports the encoders on first use
        assert r.returncode == 0, r.stderr
    r, _ = probe("itm-search", "a blue circle", "--index", idx)  # exports the reranker's graph if not yet done
    assert r.returncode == 0, r.stderr
    for cmd, args, out in [
        ("itm-index", ["--help"], "Build and inspect"), ("itm-search", ["--help"], "--threads"),
        ("itm-index", ["build", tmp_path / "photos", "--index", idx, "-q"], "0 added, 0 updated, 0 removed, 5 unch"),
        ("itm-search", ["a red square", "--index", idx, "-k", "2"], "image"),
        ("itm-search", ["--image", images[0], "--index", idx, "-k", "2", "--json"], '"kind": "text"'),
    ]:
        r, loaded = probe(cmd, *args)
        assert r.returncode == 0 and out in r.stdout, r.stderr
        assert loaded == [], f"{cmd} {args[0]} imported {loaded}"
    assert json.loads(r.stdout.splitlines()[0])["match_logit"] is not None  # reranked by the exported graph
    for source in (tmp_path / "photos", tmp_path / "caps.txt"):  # told from the listing: not even the rows are read
        r, loaded = probe("itm-index", "build", source, "--index", idx, "-q", heavy=("numpy", "pyarrow"))
        assert r.returncode == 0 and " 0 added, 0 updated, 0 removed, " in r.stdout and loaded == [], r.stderr
    r, loaded = probe("itm-search", "a red square", "--index", idx, "--backend", "torch")
    assert r.returncode == 0 and loaded[:3] == ["torch", "open_clip", "torchvision"]  # the probe sees them load


def test_an_int8_build_and_query_run_without_torch_once_the_model_is_exported(tmp_path):
    write_images(tmp_path / "photos", 5)
    idx = tmp_path / "idx"
    model = ["--model", "itm-tiny", "--pretrained", "random"]
    r = run("itm-index", "build", tmp_path / "photos", "--index", idx, "-q", "--precision", "int8", *model)
    assert r.returncode == 0 and "5 added" in r.stdout, r.stderr
    assert r.stderr == ""  # the quantizer's advice stays out of a build's output
    write_images(tmp_path / "photos" / "more", 2, seed=1)
    r, loaded = probe("itm-index", "build", tmp_path / "photos", "--index", idx, "-q", "--precision", "int8",
                      heavy=HEAVY[:3])
    assert r.returncode == 0 and "2 added" in r.stdout and loaded == [], r.stderr
    r, loaded = probe("itm-search", "a red square", "--index", idx, "-k", "3", "--precision", "int8")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3 and loaded == [], r.stderr
    r = run("itm-search", "a red square", "--index", idx, "--precision", "int8", "--backend", "torch")
    assert r.returncode == 1 and "int8 runs the onnx backend on a CPU; with --backend torch use fp32" in r.stderr


def test_an_on_disk_ivf_index_shows_in_info_and_faiss_prints_nothing_into_the_output(tmp_path):
    images = write_images(tmp_path / "photos", 12)
    idx = tmp_path / "idx"
    r = run("itm-index", "build", tmp_path / "photos", "--index", idx, "--model", "itm-tiny", "--pretrained", "random",
            "-q", "--faiss-factory", "IVF4,Flat", "--recall-target", "0.9")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1 and " added," in r.stdout, r.stdout + r.stderr
    r = run("itm-index", "info", "--index", idx)
    assert "image: IVF4,Flat, on disk, nprobe " in r.stdout and "for recall target 0.90" in r.stdout, r.stdout
    r = run("itm-search", "--image", images[1], "--kind", "image", "-k", "3", "--index", idx, "--json")
    hits = [json.loads(line) for line in r.stdout.splitlines()]  # faiss's "updating ondisk filename" line kept out
    assert r.returncode == 0 and len(hits) == 3 and hits[0]["path"] == str(images[1]), r.stdout
