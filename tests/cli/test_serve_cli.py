"""itm-serve as a user runs it, and itm-search through it: the same output as in-process, without torch."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from itm.indexer.build import BuildOptions, build_index
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.models.fusion_checkpoint import save_reranker
from itm.models.registry import resolve_model
from itm.retrieval import cli
from itm.retrieval.discovery import announcement_path, find_server
from tests.cli.test_cli import run
from tests.conftest import write_images

ODD = b"caf\xe9.png"


def start_server(index, *args) -> subprocess.Popen:
    """itm-serve on a free port, once it has announced itself for `index`; its torch on one thread, as this
    process's is (floating-point sums in another order could differ in the last bits)."""
    argv = [sys.executable, "-c", "import itm.retrieval.serve_cli as m; m.main()"]
    proc = subprocess.Popen(argv + ["--index", str(index), "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while find_server(index) is None or find_server(index).pid != proc.pid:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "itm-serve did not announce itself"
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> tuple[int, str, str]:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def in_process(capfdbinary, monkeypatch, *args) -> tuple[int, bytes, bytes]:
    """itm-search run in this process (torch already loaded, so it is fast): (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["itm-search", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capfdbinary.readouterr()
    return code, out, err


def health(index) -> dict:
    with urllib.request.urlopen(find_server(index).url + "/api/health", timeout=30) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_images(root / "photos", 6)
    os.replace(write_images(root / "tmp", 1, seed=9)[0], os.fsencode(root / "photos") + b"/" + ODD)
    (root / "caps.txt").write_text("a red square\na blue circle\na green triangle\n")
    torch.manual_seed(0)
    reranker = save_reranker(FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval(),
                             root / "reranker.safetensors")
    for name, spec in (("idx", resolve_model("itm-tiny", "random", reranker=reranker)),
                       ("plain", resolve_model("itm-tiny", "random"))):
        for source in (root / "photos", root / "caps.txt"):
            build_index(source, root / name, spec, BuildOptions(workers=1))
    return root


QUERIES = [  # itm-search arguments, after the index
    ["a red square", "-k", "3"],
    ["a red square", "-k", "5", "--json"],
    ["a photo", "-k", "7", "--paths-only"],
    ["a red square", "--no-rerank", "--json", "--kind", "all"],
    ["--image", "photos/img001.png", "--json"],
    ["--image", "photos/img002.png", "--kind", "text", "-k", "2", "--rerank-k", "2"],
    ["   "],  # an error, in the same words
    ["a red square", "--kind", "video"],
    ["--image", "caps.txt"],  # not an image
    ["--image", "photos/none.png"],  # no such file: answered in-process either way
    ["a red square", "--add", "2:a blue circle", "--sub", "a green triangle", "--add-image", "photos/img004.png",
     "--json"],
    ["2:a red square", "--sub-image", "0.5:photos/img001.png", "-k", "4"],
    ["a red square", "--path", "*/img00[1-4].png", "--orientation", "landscape", "--date", "2000..", "--json"],
    ["a red square", "--min-prob", "0.5", "--json"],  # refused without a reranker
    ["a red square", "--min-prob", "1", "--camera", "canon"],  # no match
    ["a red square", "--dedup", "--dedup-threshold", "0.9999", "--sort", "path", "-k", "3"],
]


def same_answer(a: tuple[int, bytes, bytes], b: tuple[int, bytes, bytes]) -> bool:
    """The same exit code, messages and hits in the same order, scores equal to float tolerance: a cold query
    runs its graphs without repacked weights (Runtime.quick_start), whose sums may differ in the last bits."""
    def close(x, y) -> bool:
        if isinstance(x, float) or isinstance(y, float):
            return isinstance(x, (int, float)) and isinstance(y, (int, float)) and abs(x - y) <= 1e-5 + 1e-5 * abs(y)
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(close(x[k], y[k]) for k in x)
        if isinstance(x, list) and isinstance(y, list):
            return len(x) == len(y) and all(map(close, x, y))
        return x == y

    def parsed(line: bytes):
        if line.startswith(b"{"):
            return json.loads(line)
        return [float(w) if w.replace(b".", b"", 1).lstrip(b"-").isdigit() else w for w in line.split()]

    def near(x, y) -> bool:  # printed scores have 4 decimals: one may round the other way
        if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            return all(abs(u - v) <= 1.5e-4 if isinstance(u, float) and isinstance(v, float) else u == v
                       for u, v in zip(x, y))
        return close(x, y)

    (ca, oa, ea), (cb, ob, eb) = a, b
    la, lb = oa.splitlines(), ob.splitlines()
    return ca == cb and ea == eb and len(la) == len(lb) and all(near(parsed(x), parsed(y)) for x, y in zip(la, lb))


def test_itm_search_answers_the_same_through_a_server(corpus, monkeypatch, capfdbinary):
    monkeypatch.chdir(corpus)  # --image paths as a user types them, relative
    for name in ("idx", "plain"):
        index = corpus / name
        cold = [in_process(capfdbinary, monkeypatch, *q, "--index", index) for q in QUERIES]
        assert cold[0][0] == 0 and cold[6][0] == 1 and b"query is empty" in cold[6][2]
        proc = start_server(index)
        try:
            before = health(index)["queries"]
            warm = [run("itm-search", *q, "--index", index, text=False) for q in QUERIES]
            explicit = run("itm-search", *QUERIES[1], "--server", find_server(index).url, text=False)
            answered = health(index)["queries"] - before
        finally:
            stop(proc)
        for q, c, w in zip(QUERIES, cold, warm):
            assert same_answer((w.returncode, w.stdout, w.stderr), c), q
        assert same_answer((explicit.returncode, explicit.stdout, explicit.stderr), cold[1])
        # all but the missing file (read here first) and the unknown kind (the Query refuses it before asking),
        # and the explicit --server
        assert answered == len(QUERIES) - 1
        if name == "idx":  # nothing is certain enough: one line, no hits, exit 0
            assert cold[14][0] == 0 and cold[14][1] == b"" and b"no match: nothing passes" in cold[14][2]
            assert b"plain sigmoid" in cold[14][2]  # no calibration was fitted for this reranker
        else:
            assert cold[13][0] == 1 and b"needs the index's fusion reranker" in cold[13][2]
        assert b"near-duplicates hidden" in cold[15][2] and len(cold[15][1].splitlines()) == 3
    assert b"no reranker" in cold[0][2] and b"caf\\udce9.png" in cold[1][1] + cold[4][1]


def test_the_client_path_imports_neither_torch_nor_faiss(corpus):
    index = corpus / "idx"
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: sys.stderr.write('LOADED ' + ' '.join(m for m in ('torch', 'open_clip', "
             "'faiss', 'numpy', 'PIL') if m in sys.modules) + '\\n'))\n"
             "import itm.retrieval.cli as m\nm.main()\n")
    proc = start_server(index)
    try:
        r = subprocess.run([sys.executable, "-c", probe, "a red square", "--index", str(index), "--json"],
                           capture_output=True, text=True, timeout=120)
    finally:
        stop(proc)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 7, r.stderr  # the 7 images
    assert r.stderr.strip() == "LOADED"  # none of them
    r = subprocess.run([sys.executable, "-c", probe, "a red square", "--index", str(index)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "faiss" in r.stderr.split("LOADED")[-1]  # no server: in-process, as before


def test_stopping_withdraws_and_a_killed_servers_leftover_is_ignored(corpus, monkeypatch, capfdbinary):
    index = corpus / "idx"
    expected = in_process(capfdbinary, monkeypatch, "a red square", "--index", index, "--json")
    proc = start_server(index)
    code, out, err = stop(proc)
    assert code == 0 and err == "" and f"serving {index} (7 images, 3 texts) at http://127.0.0.1:" in out
    assert not announcement_path(index).exists()

    proc = start_server(index)
    stop(proc, signal.SIGKILL)
    assert announcement_path(index).exists()
    r = run("itm-search", "a red square", "--index", index, "--json", env={"OMP_NUM_THREADS": "1"}, text=False)
    assert (r.returncode, r.stdout, r.stderr) == expected  # answered in-process
    assert not announcement_path(index).exists()  # removed by the search that found it stale


def test_user_errors_are_one_line(corpus, tmp_path):
    r = run("itm-search", "a red square", "--server", "http://127.0.0.1:9")
    assert r.returncode == 1 and r.stderr == ("itm-search: error: no itm server answers at http://127.0.0.1:9 "
                                              "(ConnectionRefusedError); start one with `itm-serve`, or leave out "
                                              "--server\n")
    proc = start_server(corpus / "idx")
    try:
        url = find_server(corpus / "idx").url
        r = run("itm-search", "a red square", "--server", url, "--index", corpus / "plain")
        assert r.returncode == 1 and f"serves the index at {corpus / 'idx'}, not {corpus / 'plain'}" in r.stderr
        taken = run("itm-serve", "--index", corpus / "plain", "--port", url.rsplit(":", 1)[1])
        assert taken.returncode == 1 and "is another server running there? Pass --port" in taken.stderr
        twice = run("itm-serve", "--index", corpus / "idx", "--port", "0")
        assert twice.returncode == 1 and f"already runs at {url} (process {proc.pid}); use it" in twice.stderr
    finally:
        stop(proc)
    r = run("itm-serve", "--index", tmp_path / "none", "--port", "0")
    assert r.returncode == 1 and r.stderr.startswith("itm-serve: error: no index at")
    assert len(r.stderr.splitlines()) == 1
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['fastapi'] = None; "
                        "import itm.retrieval.serve_cli as m; m.main()"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr == ("itm-serve: error: itm-serve needs fastapi; install them with: "
                                              "pip install 'itm[server]'\n")


SERVE = [sys.executable, "-c", "import itm.retrieval.serve_cli as m; m.main()"]
TOKEN = "correct-horse-battery-staple-42"


@pytest.mark.parametrize("extra, message", [
    ([], "--token-file PATH (or --token), or pass --no-auth"),
    (["--token", "short"], "at least 16"),
    (["--token", TOKEN, "--token-file", "x"], "not both"),
])
def test_beyond_loopback_the_server_wants_a_token_or_says_no_auth(corpus, extra, message):
    r = subprocess.run(SERVE + ["--index", str(corpus / "idx"), "--host", "0.0.0.0", "--port", "0", *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode in (1, 2) and message in r.stderr, r.stderr  # refused before it listens or loads a model
    assert find_server(corpus / "idx") is None


def test_itm_search_brings_the_token_of_the_server_it_finds(corpus, tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    index = corpus / "idx"
    proc = start_server(index, "--token-file", tmp_path / "token")
    try:
        url = find_server(index).url
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/api/health", timeout=30)
        assert refused.value.code == 401
        r = run("itm-search", "a red square", "--index", index, "--json")
        assert r.returncode == 0 and len(r.stdout.splitlines()) == 7, r.stderr
        asked = urllib.request.Request(url + "/api/health", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(asked, timeout=30) as reply:
            assert json.load(reply)["queries"] == 1  # the query went through the server, with its token
    finally:
        stop(proc)
