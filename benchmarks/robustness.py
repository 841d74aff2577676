"""Robustness figures: a hostile folder built item by item, and readers searching while a writer commits.

    python benchmarks/robustness.py [--changes 12] [--seed 0] [--out benchmarks/results/robustness.json]

- hostile folder: data/corpora.make_hostile_folder (broken, odd and huge image files,
  names that are not UTF-8 or hold newlines, dangling and looping links, a pipe, a folder named
  like an image, a decompression bomb) built with `build_index` and with `itm-index build`: how
  many kinds of entry, how many indexed and skipped, whether each had the expected outcome, and
  crashes (an exception from the library, a traceback or a non-zero exit from the command).
- reading while writing: benchmarks/read_while_write.read_while_writing with `--changes` rounds of
  adds, changes and deletes, each built (and compacted when dead rows pass the threshold) while
  two readers search: generations committed, compactions, queries answered, snapshots checked
  against what the writer committed, errors.

The tiny registered model (itm-tiny, seeded random weights) and a random fusion-tiny reranker
are used: the figures are about correctness under stress, not about speed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

from itm.data.corpora import make_hostile_folder
from itm.indexer.build import BuildOptions, build_index
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.models.fusion_checkpoint import save_reranker
from itm.models.registry import resolve_model

import benchlib
from read_while_write import read_while_writing


def hostile_folder(tmp: Path) -> dict:
    root = tmp / "hostile"
    expected = make_hostile_folder(root)
    spec = resolve_model("itm-tiny", "random")
    skipped: list[str] = []
    crashes: list[str] = []
    report = None
    try:
        report = build_index(root, tmp / "idx", spec, BuildOptions(batch_size=8),
                             on_skip=lambda p, why: skipped.append(os.path.relpath(p, root)))
        again = build_index(root, tmp / "idx", spec, BuildOptions(batch_size=8))
    except Exception:  # noqa: BLE001 - a crash is the figure
        crashes.append(traceback.format_exc(limit=3))
    env = dict(os.environ)
    cli = subprocess.run([sys.executable, "-c", "from itm.indexer.cli import main; main()", "build", str(root),
                          "--index", str(tmp / "idx-cli"), "--model", "itm-tiny", "--pretrained", "random", "-q"],
                         capture_output=True, env=env)
    if cli.returncode != 0 or b"Traceback" in cli.stderr:
        crashes.append(cli.stderr.decode(errors="backslashreplace")[-2000:])
    wrong = sorted(n for n, o in expected.items() if (o == "skip") != (n in skipped))
    return {"kinds": len(expected), "expected_ok": sum(o == "ok" for o in expected.values()),
            "indexed": report.images if report else None, "skipped": report.skipped if report else None,
            "unexpected_outcomes": wrong, "rebuild_unchanged": again.unchanged if report else None,
            "cli_skip_lines": cli.stderr.count(b"itm-index: skipping "), "crashes": len(crashes),
            "crash_details": crashes}


def reading_while_writing(tmp: Path, changes: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval()
    spec = resolve_model("itm-tiny", "random", reranker=save_reranker(model, tmp / "reranker.safetensors"))
    start = time.perf_counter()
    f = read_while_writing(tmp / "run", spec, changes=changes, seed=seed)
    return {"changes": changes, "generations": f.generations, "compactions": f.compactions, "queries": f.queries,
            "snapshots_checked": f.snapshots, "errors": len(f.errors), "error_details": f.errors,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=12, help="rounds of adds, changes and deletes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is faster than two contended ones
    facts = benchlib.machine_facts()
    with tempfile.TemporaryDirectory(prefix="itm-robustness-") as tmp:
        hostile = hostile_folder(Path(tmp) / "h")
        rww = reading_while_writing(Path(tmp) / "r", args.changes, args.seed)
    facts = benchlib.finish(facts)
    print(benchlib.describe_machine(facts))
    print()
    print(f"hostile folder: {hostile['kinds']} kinds of odd and broken entries; {hostile['indexed']} indexed "
          f"(expected {hostile['expected_ok']}), {hostile['skipped']} skipped with a reason, "
          f"{len(hostile['unexpected_outcomes'])} unexpected outcomes, {hostile['crashes']} crashes "
          f"(library and itm-index build); a rebuild found {hostile['rebuild_unchanged']} unchanged")
    print(f"reading while writing: {rww['generations']} generations committed ({rww['compactions']} compactions) "
          f"while 2 readers answered {rww['queries']} queries and checked {rww['snapshots_checked']} snapshots "
          f"against what was committed; {rww['errors']} errors ({rww['seconds']:.1f}s)")
    for detail in hostile["crash_details"] + rww["error_details"]:
        print(detail)
    benchlib.write_json(args.out, {"benchmark": "robustness", "machine": facts, "settings": {"changes": args.changes, "seed": args.seed},
                                   "hostile_folder": hostile, "reading_while_writing": rww})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
