"""itm against rclip, the same architecture (open_clip ViT-B-32-256, random weights) on the same images.

    python -m venv /tmp/rclip-venv && /tmp/rclip-venv/bin/pip install rclip
    python -m venv /tmp/itm-venv && /tmp/itm-venv/bin/pip install .
    python benchmarks/vs_rclip.py --rclip-python /tmp/rclip-venv/bin/python [--itm-venv /tmp/itm-venv]
        [--runs 5] [--build-runs 3] [--cache DIR] [--out benchmarks/results/vs_rclip.json] [--quick]

With --itm-venv, itm's commands are that environment's, installed as a user installs them, as
rclip's are; without it, this interpreter's (a development install pays for every .pth file of
its site-packages and for the editable-install finder at each start).

Each row times whole commands as a user runs them, itm and rclip in turn (A B A B ...), each in a
new process, and gives medians and the median of the pair-by-pair ratios (itm / rclip for times,
itm / rclip for rates), so that a comparison holds while the machine's speed drifts:

- `--help` of the query command (the start-up alone);
- text query and image query from the shell on a 300-image index (itm-search against `rclip
  QUERY`; rclip checks its folder for changes first, as it does by default);
- the text query again with itm-serve running for the index (itm-search asks it; rclip has no
  server, so it answers cold as above);
- rebuild with nothing changed (itm-index build against rclip's own indexing entry point);
- build from scratch of 300 JPEGs of 640x480 and of 48 JPEGs of 12 MP (index and database
  deleted before each run; the exported model files of both are kept, as a second build finds them);
- on a CPU with native bf16 arithmetic, the 300-JPEG build again with itm's --precision bf16 (the
  torch backend; not the default, as bf16 embeddings differ from fp32's by about 1e-4 in cosine);
- both builds again with itm's --precision int8 (the onnx backend's graphs with int8 matrix
  products; not the default either, as its embeddings differ from fp32's; the untimed warm-up
  build of each row makes its graphs, as the first build makes the fp32 export);
- with --quick, only the rows above this one: the commands a user waits on, in a few minutes;
- 12 MP: the build's rate (its scan/decode/encode loop, BuildReport.timings.embed_s less the
  model's set-up within it, as build_throughput.py counts it) against the
  model-only forward rate on already prepared pixels in the same batches, in this process,
  interleaved F B F B F B F, each build against the mean of the two forward runs beside it.

rclip cannot download its model here, so random-weight stand-ins are exported the way rclip's
own conversion script exports the real ones, into the folder rclip reads before any download.
Peak memory is each command's largest resident set (the kernel's accounting of the finished
process). The load average before and after is printed: figures taken from a start at a load
above 0.5 on this 2-core kind of machine are not final (the load at the end is the benchmark's
own work).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import benchlib

QUERY = "a red circle left of a blue square"
SMALL, BIG = (300, 640, 480), (48, 4000, 3000)  # count, width, height
MODEL = ["--model", "ViT-B-32-256", "--pretrained", "random"]
RCLIP_MODEL_DIR = "ViT-B-32-256-datacomp_s34b_b86k"  # the model folder rclip 3.x looks for in RCLIP_DATADIR
RCLIP_INDEX = "from rclip.main import init_rclip; import os, sys; os.chdir(sys.argv[1]); " \
              "r, m, d = init_rclip(os.getcwd(), 8); r.close(); m.close(); d.close()"  # indexing only, as rclip runs it
QUIET_LOAD = 0.5


def make_corpora(root: Path) -> tuple[Path, Path]:
    """300 JPEGs of 640x480 (random colour blocks upscaled, plus noise) and 48 of 4000x3000 (smooth
    gradients plus noise, about 3 MB each), q90, from one seeded generator; made once."""
    small, big = root / "small", root / "big"
    if (root / ".complete").is_file():
        return small, big
    small.mkdir(parents=True, exist_ok=True)
    big.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    count, w, h = SMALL
    for i in range(count):
        gh, gw = rng.integers(2, 12), rng.integers(2, 16)
        blocks = rng.integers(0, 256, size=(gh, gw, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(blocks).resize((w, h), Image.BILINEAR), dtype=np.float32)
        noise = rng.normal(0, rng.uniform(4, 30), size=(h, w, 3)).astype(np.float32)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(small / f"s{i:04d}.jpg", quality=90)
    count, w, h = BIG
    y, x = np.linspace(0, 1, h, dtype=np.float32)[:, None], np.linspace(0, 1, w, dtype=np.float32)[None, :]
    for i in range(count):
        channels = []
        for _ in range(3):
            a, b, c, d = rng.uniform(-1, 1, 4)
            f1, f2 = rng.uniform(0.5, 3, 2)
            channels.append(128 + 90 * (a * x + b * y)
                            + 40 * np.sin(2 * np.pi * (f1 * x + c)) * np.cos(2 * np.pi * (f2 * y + d)))
        img = np.stack(channels, axis=-1) + rng.normal(0, 7, size=(h, w, 3)).astype(np.float32)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(big / f"b{i:03d}.jpg", quality=90)
    (root / ".complete").write_text("")
    return small, big


def export_rclip_model(data: Path) -> None:
    """rclip's visual.onnx and textual.onnx from open_clip ViT-B-32-256 with random weights, exported as
    rclip's conversion script exports the real ones (wrappers, names, opset 18, TorchScript exporter)."""
    folder = data / RCLIP_MODEL_DIR
    if (folder / "textual.onnx").is_file():
        return
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-256", pretrained=None).eval()

    class Visual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = model.visual

        def forward(self, x):
            return self.visual(x)

    class Textual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip_model = model

        def forward(self, x):
            return self.clip_model.encode_text(x)

    torch.backends.mha.set_fastpath_enabled(False)
    for wrapper, dummy, name in ((Visual(), torch.randn(1, 3, 256, 256), "visual.onnx"),
                                 (Textual(), torch.zeros(1, 77, dtype=torch.long), "textual.onnx")):
        torch.onnx.export(wrapper.eval(), (dummy,), str(folder / name), input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=18, dynamo=False)
    (data / "tokenizer").mkdir(exist_ok=True)
    shutil.copy2(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz", data / "tokenizer")


# Each command is started by a small launcher, not by this process: a child forked from a large process
# counts that process's pages in its own peak resident set until it runs the command.
LAUNCHER = ("import os, sys, time\n"
            "t = time.perf_counter(); pid = os.fork()\n"
            "if pid == 0: os.execvp(sys.argv[1], sys.argv[1:])\n"
            "_, status, usage = os.wait4(pid, 0)\n"
            "print(f'\\n{time.perf_counter() - t} {usage.ru_maxrss}', file=sys.stderr)\n"
            "sys.exit(os.waitstatus_to_exitcode(status))")


def run(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak resident MB) of one command, which must succeed."""
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *map(str, argv)], env={**os.environ, **(env or {})},
                          cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stderr}")
    wall, kb = proc.stderr.rsplit("\n", 2)[-2].split()
    return float(wall), int(kb) / 1024


def paired(name: str, itm, rclip, runs: int, items: int | None = None) -> dict:
    """`itm` and `rclip` (callables returning (seconds, MB)) in turn after one warm-up each; medians and ratios."""
    itm(), rclip()
    a, b = [], []
    for _ in range(runs):
        a.append(itm())
        b.append(rclip())
    row = {"work": name, "runs": runs,
           "itm_s": statistics.median(x[0] for x in a), "rclip_s": statistics.median(x[0] for x in b),
           "itm_mb": statistics.median(x[1] for x in a), "rclip_mb": statistics.median(x[1] for x in b),
           "time_ratio": statistics.median(x[0] / y[0] for x, y in zip(a, b)),
           "time_ratio_range": [min(x[0] / y[0] for x, y in zip(a, b)), max(x[0] / y[0] for x, y in zip(a, b))],
           "mem_ratio": statistics.median(x[1] / y[1] for x, y in zip(a, b))}
    if items:
        row["itm_rate"], row["rclip_rate"] = items / row["itm_s"], items / row["rclip_s"]
        row["rate_ratio"] = statistics.median(y[0] / x[0] for x, y in zip(a, b))
    print(f"  {name}: itm {row['itm_s']:.2f} s {row['itm_mb']:.0f} MB, rclip {row['rclip_s']:.2f} s "
          f"{row['rclip_mb']:.0f} MB", flush=True)
    return row


class Tools:
    """The two programs, each with its index of one folder."""

    def __init__(self, rclip_python: Path, work: Path, itm_venv: Path | None = None):
        self.itm_index, self.itm_search, self.itm_serve = (
            _command(name, module, itm_venv) for name, module in (("itm-index", "itm.indexer.cli"),
                                                                  ("itm-search", "itm.retrieval.cli"),
                                                                  ("itm-serve", "itm.retrieval.serve_cli")))
        self.rclip_python, self.work = rclip_python, work
        self.rclip = [str(rclip_python), "-c", "from rclip.main import main; main()"]
        self.rclip_data = work / "rclip-data"

    def itm_build(self, folder: Path, index: Path, fresh: bool = False, *extra: str):
        if fresh:
            shutil.rmtree(index, ignore_errors=True)
        return run(self.itm_index + ["build", str(folder), "--index", str(index), "-q", *extra]
                   + (MODEL if fresh else []))

    def rclip_build(self, folder: Path, fresh: bool = False):
        if fresh:
            (self.rclip_data / "db.sqlite3").unlink(missing_ok=True)
        return run([str(self.rclip_python), "-c", RCLIP_INDEX, str(folder)], self.rclip_env())

    def itm_query(self, index: Path, *query: str):
        return run(self.itm_search + [*query, "--index", str(index), "-k", "10"])

    def rclip_query(self, folder: Path, query: str):
        return run(self.rclip + [query, "-t", "10"], self.rclip_env(), cwd=folder)

    def rclip_env(self) -> dict[str, str]:
        return {"RCLIP_DATADIR": str(self.rclip_data), "HF_HUB_OFFLINE": "1"}


def _command(name: str, module: str, venv: Path | None = None) -> list[str]:
    if venv is not None:
        return [str(venv / "bin" / name)]
    exe = shutil.which(name)
    return [exe] if exe else [sys.executable, "-c", f"import {module} as m; m.main()"]


def slow_rows(tools: Tools, small: Path, big: Path, args) -> list[dict]:
    """The builds from scratch: default, bf16 where the CPU has it natively, and int8."""
    rows = [
        paired("build from scratch, 300 JPEGs 640x480", lambda: tools.itm_build(small, args.cache / "itm-b", True),
               lambda: tools.rclip_build(small, True), args.build_runs, items=SMALL[0]),
        paired("build from scratch, 48 JPEGs of 12 MP", lambda: tools.itm_build(big, args.cache / "itm-b", True),
               lambda: tools.rclip_build(big, True), args.build_runs, items=BIG[0]),
    ]
    if _native_bf16():  # the torch backend in bf16: not the default, since its embeddings differ from fp32's
        rows.append(paired("build from scratch, 300 JPEGs 640x480, itm --precision bf16",
                           lambda: tools.itm_build(small, args.cache / "itm-b", True, "--precision", "bf16"),
                           lambda: tools.rclip_build(small, True), args.build_runs, items=SMALL[0]))
    for (count, width, height), corpus in ((SMALL, small), (BIG, big)):  # not the default: answers change a little
        name = f"{width}x{height}" if corpus is small else f"of {width * height / 1e6:.0f} MP"
        rows.append(paired(f"build from scratch, {count} JPEGs {name}, itm --precision int8",
                           lambda c=corpus: tools.itm_build(c, args.cache / "itm-b", True, "--precision", "int8"),
                           lambda c=corpus: tools.rclip_build(c, True), args.build_runs, items=count))
    return rows


def forward_ratio(folder: Path, builds: int) -> dict:
    """The 12 MP build's rate against the model-only forward rate, in this process (as build_throughput.py)."""
    from itm.common.options import BuildOptions
    from itm.indexer.build import build_index
    from itm.models.loading import load_item_encoder
    from itm.models.registry import resolve_model

    spec, opts = resolve_model("ViT-B-32-256", "random"), BuildOptions()
    encoder = load_item_encoder(spec)
    paths = sorted(folder.glob("*.jpg"))
    pixels = np.stack([encoder.load_pixels(p) for p in paths])

    def forward() -> float:
        start = time.perf_counter()
        for i in range(0, len(pixels), opts.batch_size):
            encoder.encode_images(pixels[i:i + opts.batch_size])
        return len(pixels) / (time.perf_counter() - start)

    def build() -> float:  # the scan/decode/encode loop, without the model's set-up inside it
        index = folder.parent / "forward-ratio-index"
        shutil.rmtree(index, ignore_errors=True)
        timings = build_index(folder, index, spec, opts).timings
        return len(paths) / (timings.embed_s - timings.model_load_s)

    forward()  # warm-up
    fwd, ratios, rates = [forward()], [], []
    for _ in range(builds):
        rates.append(build())
        fwd.append(forward())
        ratios.append(rates[-1] / ((fwd[-2] + fwd[-1]) / 2))
    print(f"  12 MP build / forward: {statistics.median(ratios):.2f}", flush=True)
    return {"work": "12 MP build rate / model-only forward rate", "build_rate": statistics.median(rates),
            "forward_rate": statistics.median(fwd), "ratio": statistics.median(ratios), "ratios": ratios}


def _native_bf16() -> bool:
    from itm.models.encoder import cpu_has_native_bf16

    return cpu_has_native_bf16()


def compile_itm() -> None:
    """Bytecode for itm's modules, as an install writes it (an editable checkout may have none, and a
    process that finds none compiles every module it imports, each run)."""
    import compileall
    import importlib.util

    for package in ("indexer", "retrieval"):
        compileall.compile_dir(Path(importlib.util.find_spec(package).origin).parent, quiet=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rclip-python", type=Path, required=True, help="python of a virtual environment with rclip")
    ap.add_argument("--itm-venv", type=Path, help="virtual environment with itm installed (pip install .)")
    ap.add_argument("--runs", type=int, default=5, help="counted runs of each query and no-op row")
    ap.add_argument("--build-runs", type=int, default=3, help="counted runs of each build row, and 12 MP builds")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "itm-vs-rclip")
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    ap.add_argument("--quick", action="store_true", help="only the commands a user waits on: --help, queries "
                    "(cold and through itm-serve), the rebuild with nothing to do")
    args = ap.parse_args()
    facts = benchlib.machine_facts()
    if facts["loadavg_start"][0] > QUIET_LOAD:
        print(f"warning: load average {facts['loadavg_start'][0]:.2f} > {QUIET_LOAD}: the figures are not final",
              flush=True)
    os.environ.setdefault("ITM_CACHE_DIR", str(args.cache / "itm-cache"))  # itm's exported model, for this run
    small, big = make_corpora(args.cache / "corpora")
    if args.itm_venv is None:
        compile_itm()
    elif not (args.itm_venv / "bin" / "itm-search").is_file():
        sys.exit(f"no itm-search in {args.itm_venv}/bin: python -m venv {args.itm_venv} && "
                 f"{args.itm_venv}/bin/pip install .")
    facts["itm_install"] = f"virtual environment {args.itm_venv}" if args.itm_venv else f"{sys.executable}"
    tools = Tools(args.rclip_python, args.cache, args.itm_venv)
    export_rclip_model(tools.rclip_data)
    idx = args.cache / "itm-small"
    print("preparing the indexes (itm exports its model on first use)", flush=True)
    tools.itm_build(small, idx, fresh=True)
    tools.rclip_build(small, fresh=True)
    probe = next(small.glob("*.jpg"))
    rows = [
        paired("--help of the query command", lambda: run(tools.itm_search + ["--help"]),
               lambda: run(tools.rclip + ["--help"], tools.rclip_env()), args.runs),
        paired("text query, 300-image index", lambda: tools.itm_query(idx, QUERY),
               lambda: tools.rclip_query(small, QUERY), args.runs),
        paired("image query, 300-image index", lambda: tools.itm_query(idx, "--image", str(probe)),
               lambda: tools.rclip_query(small, str(probe)), args.runs),
    ]
    server = benchlib.start_server(tools.itm_serve, idx)
    try:
        rows.append(paired("text query with itm-serve running, 300-image index", lambda: tools.itm_query(idx, QUERY),
                           lambda: tools.rclip_query(small, QUERY), args.runs))
    finally:
        server.terminate()
        server.wait(timeout=60)
    rows.append(paired("rebuild with nothing changed, 300 images", lambda: tools.itm_build(small, idx),
                       lambda: tools.rclip_build(small), args.runs))
    if not args.quick:
        rows += slow_rows(tools, small, big, args)
    ratio = None if args.quick else forward_ratio(big, args.build_runs)
    facts = benchlib.finish(facts)
    # the machine was quiet if nothing ran before the start; the load at the end is this benchmark's own
    quiet = facts["loadavg_start"][0] <= QUIET_LOAD
    print(f"\nitm vs rclip 3.x, open_clip ViT-B-32-256 random weights, {time.strftime('%Y-%m-%d')}")
    print(benchlib.describe_machine(facts) + ("" if quiet else "  [UNDER LOAD: not final]"))
    print(f"itm run from {facts['itm_install']}; rclip from {args.rclip_python}")
    print(benchlib.format_table(rows, [
        ("work", "work", "s"), ("itm_s", "itm s", ".2f"), ("rclip_s", "rclip s", ".2f"),
        ("time_ratio", "itm/rclip time", ".2f"), ("itm_rate", "itm img/s", ".1f"), ("rclip_rate", "rclip img/s", ".1f"),
        ("rate_ratio", "itm/rclip rate", ".2f"), ("itm_mb", "itm MB", ".0f"), ("rclip_mb", "rclip MB", ".0f"),
        ("mem_ratio", "itm/rclip MB", ".2f")]))
    if ratio is not None:
        print(f"12 MP build {ratio['build_rate']:.1f} img/s, model-only forward {ratio['forward_rate']:.1f} img/s: "
              f"ratio {ratio['ratio']:.2f} (median of {args.build_runs} builds)")
    benchlib.write_json(args.out, {"machine": facts, "quiet": quiet, "rows": rows, "forward_ratio": ratio})


if __name__ == "__main__":
    main()
