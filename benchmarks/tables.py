"""Regenerate the figure tables of README.md and docs/*.md from benchmarks/results/*.json.

    python benchmarks/tables.py            # rewrite every table in place
    python benchmarks/tables.py --check    # exit 1, naming the table, when a document's table is not the JSON's

A generated table sits between two markers, and everything between them is this script's:

    <!-- table: NAME -->
    | ... |
    <!-- /table -->

NAME is one of TABLES below. Standard library only, and no itm import: the figures come from the JSON
the benchmark scripts wrote, never from running anything.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/*.md")  # globs under --root that may hold tables
MARKED = re.compile(r"(<!-- table: ([a-z0-9-]+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)
BENCH = "docs/benchmarks.md"  # where the headline table's links point, relative to the README

Json = dict[str, Any]
Lines = list[str]


class Results:
    """The results folder, each JSON file read once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._read: dict[str, Json] = {}

    def __call__(self, name: str) -> Json:
        if name not in self._read:
            self._read[name] = json.loads((self.folder / f"{name}.json").read_text(encoding="utf-8"))
        return self._read[name]


# ---------------------------------------------------------------- formatting


def f1(x: float) -> str:
    return f"{x:.1f}"


def f2(x: float) -> str:
    return f"{x:.2f}"


def pct(share: float) -> str:
    """A share (0..1) as a percentage with one decimal."""
    return f"{100 * share:.1f}%"


def ms(x: float) -> str:
    return f"{x:.1f} ms" if x < 100 else f"{x:,.0f} ms"


def mb(x: float) -> str:
    return f"{x:,.0f} MB"


def row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> Lines:
    return [row(*head), row(*["---"] * len(head)), *(row(*r) for r in rows)]


def machine(m: Json) -> str:
    """One line naming the machine a result file records, and when it ran, as far as the file says."""
    if "cpu_family_model" not in m:
        return f"{m.get('cpu', 'CPU')}, {m.get('cores', '?')} cores"
    started = (m.get("started_at") or "")[:10]
    return f"{m.get('cpu_model', 'CPU')} ({m['cpu_family_model']}), {m.get('cpus_usable', m.get('cpu_count'))} " \
           f"cores{', ' + started if started else ''}"


def source(name: str, m: Json | None = None) -> str:
    return f"`benchmarks/results/{name}.json`" + (f"; {machine(m)}" if m else "") + "."


def note(*parts: str) -> Lines:
    """The line under a table: a blank line, then the parts joined."""
    return ["", "".join(parts)]


# ---------------------------------------------------------------- quality of the demo model


def quality_report(r: Results) -> Lines:
    d = r("quality_report")
    o, st = d["oracle"]["all"], d["stages"]
    cols = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "rsum")
    rows = [("oracle", *(f1(o[c]) for c in cols), "100", "100", "100")]
    for name, s in st.items():
        a = s["all"]
        rows.append((name, *(f1(a[c]) for c in cols), f1(a["t2i_truth1"]), f1(a["t2i_truth5"]), f1(a["i2t_truth1"])))
    head = ("", "t2i R@1", "R@5", "R@10", "i2t R@1", "RSUM", "t2i truth@1", "truth@5", "i2t truth@1")
    return table(head, rows) + note(
        f"{d['images']:,} images x {d['captions'] // d['images']} captions, model `{d['model']}`, images in ",
        f"{d['image_precision']}; ", source("quality_report", d["machine"]))


def swap_accuracy(r: Results) -> Lines:
    s = r("quality_report")["swap"]
    kinds = sorted(s["count"], key=lambda k: -s["count"][k])
    rows = [(k.replace("_", " "), f"{s['count'][k]:,}", f1(s["dual"][k]), f1(s["fusion"][k])) for k in kinds]
    rows += [("all", f"{s['pairs']:,}", f1(s["dual"]["all"]), f1(s["fusion"]["all"])),
             ("held-out colour-shape pairs", "", f1(s["dual"]["held_out"]), f1(s["fusion"]["held_out"]))]
    return table(("true caption above its false one", "pairs", "dual encoders", "fused (reranker)"), rows)


def twins(r: Results) -> Lines:
    t = r("quality_report")["twins"]
    stages = [k for k in t if k != "captions"]
    rows = [(k.replace("_", "-").replace("all", "all twins"), *(f1(t[s][k]) for s in stages))
            for k in ("position_swap", "colour_swap", "all")]
    return table(("true image above its twin", *stages), rows) + \
        note(f"{t['captions']:,} captions whose image has a twin in the test split.")


FAILS = ("where", "shape", "colour", "size", "several", "binding")


def quality_by_kind(r: Results) -> Lines:
    d = r("quality_report")
    rec, two = d["by_kind"]["recall only"], d["by_kind"]["two-stage k=50"]
    kinds = sorted(two, key=lambda k: (k != "all", -two[k]["captions"]))
    rows = [(k, f"{two[k]['captions']:,}", f1(rec[k]["truth1"]), f1(two[k]["truth1"]),
             *(f1(two[k]["false"][f]) for f in FAILS)) for k in kinds]
    held = d["by_kind_held_out"]
    for w, label in (("without", "images of seen colour-shape pairs only"),
                     ("with", "images holding a held-out pair")):
        a, b = held["recall only"][w]["all"], held["two-stage k=50"][w]["all"]
        rows.append((label, f"{b['captions']:,}", f1(a["truth1"]), f1(b["truth1"]),
                     *(f1(b["false"][f]) for f in FAILS)))
    return table(("captions", "n", "truth@1 recall", "truth@1 two-stage",
                  *(f"top image wrong: {f}" for f in FAILS)), rows) + note(
        "Failures are % of that kind's captions, two-stage k=50: `where` the objects are there but not in the said ",
        "relation or position; `binding` attributes of the right objects exchanged.")


VARIANTS = (("quality_report", "bundled model (fp32)"),
            ("quality_report_int8", "bundled model, images encoded in int8"),
            ("quality_report_rerun", "quiet rerun of the recipe (its own robust image tower)"),
            ("quality_report_reranker_stage",
             "reranker stage's checkpoint, encoder before its robust stage, weight 1.0"))


def quality_variants(r: Results) -> Lines:
    rows = []
    for name, label in VARIANTS:
        d = r(name)
        a, rec = d["stages"]["two-stage k=50"]["all"], d["stages"]["recall only"]["all"]
        rows.append((label, f"`{name}.json`", f1(a["t2i_truth1"]), f1(a["t2i_r1"]), f1(a["t2i_r10"]),
                     f1(a["i2t_truth1"]), f1(a["i2t_r1"]), f1(d["swap"]["fusion"]["all"]),
                     f1(d["twins"]["two-stage k=50"]["all"]), f1(rec["t2i_truth1"])))
    return table(("model", "results", "t2i truth@1", "R@1", "R@10", "i2t truth@1", "i2t R@1", "swap fused",
                  "twins", "t2i truth@1 by recall"), rows) + note("Seed-0 test split, two-stage k=50 unless said.")


def quality_robustness(r: Results) -> Lines:
    d = r("quality_robustness")
    pair = (lambda x, a, b: f"{f1(x[a])} / {f1(x[b])}")
    rows = [(name, pair(x, "t2i_truth1_recall", "t2i_truth1"), f"{f1(x['t2i_r1'])} ({f1(x['t2i_r1_of_oracle'])})",
             f1(x["i2t_truth1"]), f"{f1(x['swap_fusion'])} ({f1(x['swap_fusion_held_out'])})", f1(x["swap_dual"]),
             pair(x, "twins_recall", "twins_two_stage"), pair(x, "r10_recall", "r10_two_stage"))
            for name, x in d["rows"].items()]
    deg = ", ".join(f"{k}: scale {v['scale']:g}, JPEG quality {v['jpeg_quality']}"
                    for k, v in d["degradations"].items())
    head = ("split", "t2i truth@1 recall / two-stage", "R@1 two-stage (% of oracle)", "i2t truth@1",
            "swap fused (held-out)", "swap dual", "twins recall / two-stage", "R@10 recall / two-stage")
    return table(head, rows) + note(f"Model `{d['model']}`, k={d['rerank_k']}; {deg}. ",
                                    source("quality_robustness", d["machine"]))


def encoder_robustness(r: Results) -> Lines:
    d = r("encoder_robustness")
    rows = [(f"`{enc}`", cond, f1(x["t2i_truth1"]), f1(x["t2i_r1"]), f1(x["i2t_truth1"]))
            for enc, conds in d["rows"].items() for cond, x in conds.items()]
    return table(("encoder", "images", "t2i truth@1", "t2i R@1", "i2t truth@1"), rows) + \
        note(f"Recall only, {d['split']} split. " + source("encoder_robustness", d["machine"]))


def region_probe(r: Results) -> Lines:
    d = r("region_probe")
    c, read = d["composition"], set(d["read_by_reranker"])
    rows = [(f"{layer}{' (read by the reranker)' if int(layer) in read else ''}",
             f1(x["shape"]["seen"]), f1(x["shape"]["held_out"]), f1(x["colour"]["seen"]), f1(x["colour"]["held_out"]),
             f1(min(min(v.values()) for v in d["layers"][layer].values())))
            for layer, x in c["layers"].items()]
    return table(("image layer", "shape, seen pair", "shape, held-out pair", "colour, seen", "colour, held-out",
                  "all cells: lowest of colour, shape, size"), rows) + \
        note(f"Probes fitted on {d['train_images']} test images' cells; held-out columns: fitted without the "
             f"{c['cells_held_out']} cells of held-out pairs ({c['cells_seen']} seen). "
             + source("region_probe", d["machine"]))


def relation_words(r: Results) -> Lines:
    d = r("relation_words")
    rows = []
    for enc, pairs in d["encoders"].items():
        for pair, x in pairs.items():
            rows.append((f"`{enc}`", pair, f"{x['pairs']:,}", " / ".join(f"{v:.3f}" for v in x["mean"]),
                         " / ".join(f"{v:.3f}" for v in x["p5"]), f"{x['largest_over_layers_mean']:.3f}"))
    return table(("encoder", "words", "caption pairs", "mean distance per layer", "5th percentile per layer",
                  "largest over layers, mean"), rows) + \
        note("Cosine distance between a caption's and its relation flip's text tokens at the three layers the reranker "
             "reads (first to last). " + source("relation_words", d["machine"]))


# ---------------------------------------------------------------- speed


def vs_rclip(r: Results) -> Lines:
    d = r("vs_rclip")
    rows = []
    for x in d["rows"]:
        work = re.sub(r"itm (--precision \w+)", r"itm `\1`", x["work"])
        if "itm_rate" in x:
            rows.append((work, f"{f1(x['itm_s'])} s ({f1(x['itm_rate'])} img/s), {mb(x['itm_mb'])}",
                         f"{f1(x['rclip_s'])} s ({f1(x['rclip_rate'])} img/s), {mb(x['rclip_mb'])}",
                         f"rate {f2(x['rate_ratio'])}x, memory {f2(x['mem_ratio'])}"))
        else:
            rows.append((work, f"{f2(x['itm_s'])} s, {mb(x['itm_mb'])}", f"{f2(x['rclip_s'])} s, {mb(x['rclip_mb'])}",
                         f"time {f2(x['time_ratio'])}, memory {f2(x['mem_ratio'])}"))
    fr = d["forward_ratio"]
    rows.append((fr["work"], f"{f1(fr['build_rate'])} / {f1(fr['forward_rate'])} img/s", "", f2(fr["ratio"])))
    m = d["machine"]
    return table(("work", "itm", "rclip", "itm / rclip"), rows) + \
        note(f"Medians of {d['rows'][0]['runs']} runs (builds: {d['rows'][-1]['runs']}); load average "
             f"{m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end. "
             + source("vs_rclip", m))


def build_throughput(r: Results) -> Lines:
    d = r("build_throughput")
    rows = []
    for x in d["results"]:
        c, s = x["corpus"], x["stage_ms"]
        decode = s["read"] + s["hash"] + s["load_image"] + s["prepare"]
        lo, hi = x["ratio_embed_range"]
        rows.append((f"{c['count']} x {c['width']}x{c['height']} ({'+'.join(c['formats'])})",
                     f"{s['read']:.1f} / {s['hash']:.1f} / {s['load_image']:.1f} / {s['prepare']:.1f} = {decode:.1f}",
                     f1(x["model_items_per_s"]), f2(x["ratio_bound"]), f"{f2(x['ratio_embed'])} ({f2(lo)}-{f2(hi)})"))
    st = d["settings"]
    return table(("corpus", "decode ms per image on one core: read / hash / decode / prepare = total",
                  "forward images/s", "bound on build / forward", "build / forward reached (range)"), rows) + \
        note(f"{st['model']} ({st['pretrained']} weights), batch {st['batch_size']}, {st['precision']}, "
             f"{st['repeats']} builds each. " + source("build_throughput", d["machine"]))


def precision(r: Results) -> Lines:
    d = r("precision")
    x = next(m for m in d["results"] if m["model"] == "ViT-B-32")
    names = ("torch fp32", "onnx fp32", "torch bf16", "onnx int8")
    rates, cos = x["rates"], x["cosine_to_torch_fp32"]
    base = rates["onnx fp32"]
    img = [f1(rates[n]["images_per_s"]) + (f" ({rates[n]['images_per_s'] / base['images_per_s']:.2f}x onnx fp32)"
                                           if n == "onnx int8" else "") for n in names]
    txt = [f1(rates[n]["texts_per_s"]) + (f" ({rates[n]['texts_per_s'] / base['texts_per_s']:.2f}x)"
                                          if n == "onnx int8" else "") for n in names]
    close = ["1"] + [f"{cos[n]['images']['min_cos']:.5f} / {cos[n]['texts']['min_cos']:.5f}" for n in names[1:]]
    st = d["settings"]
    return table(("ViT-B-32", *names), [("images/s", *img), ("texts/s", *txt),
                                        ("min cosine to torch fp32, images / texts", *close)]) + \
        note(f"Random weights, batch {st['batch_size']}, {st['threads']} threads; CPU flags "
             f"{', '.join(d['cpu_flags'])}. " + source("precision", d["machine"]))


def store_int8(r: Results) -> Lines:
    d = r("store_int8")
    rows = []
    for dtype, x in d["results"].items():
        a = x["stages"]["two-stage k=50"]["all"]
        rows.append((dtype, f"{d['bytes_per_item']['image'][dtype]:,}",
                     *(f"{a[c]:.2f}" for c in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "rsum")),
                     f"{x['swap']['fusion']['all']:.2f}"))
    first = next(iter(d["results"].values()))
    return table(("rerank store", "bytes per image", "two-stage k=50 t2i R@1", "R@5", "i2t R@1", "R@5", "RSUM",
                  "swap accuracy (fusion)"), rows) + \
        note(f"Model `{d['model']}`, {first['images']} test images, {first['captions']:,} captions. "
             + source("store_int8", d["machine"]))


def query_latency(r: Results) -> Lines:
    d = r("query_latency")
    rows = [(x["stage"], x["index"], f"{x['p50_ms']:.2f} ms", f"{x['p95_ms']:.2f} ms",
             f"{x['batched_ms_per_query']:.2f} ms" if "batched_ms_per_query" in x else "") for x in d["rows"]]
    t = d["total_ms"]
    rows.append(("encode + recall", "", f"{t['p50_ms']:.2f} ms", f"{t['p95_ms']:.2f} ms", ""))
    st = d["settings"]
    return table(("stage", "what", "p50", "p95", "batched, per query"), rows) + \
        note(f"{st['model']} ({st['pretrained']} weights), {st['n']:,} vectors of {st['dim']} dimensions in "
             f"{st['clusters']:,} clusters, k={st['k']}, {st['queries']} single queries; {d['approx_factory']} "
             f"recall@{st['k']} against Flat {d['recall_at_k']:.3f}, built in {d['build_s']['approx']:.1f} s. "
             + source("query_latency", d["machine"]))


def fusion_latency(r: Results) -> Lines:
    rows, ks = [], []
    for name in ("fusion_latency", "fusion_latency_demo"):
        d = r(name)
        ks = sorted({x["k"] for x in d["rows"]})
        groups = sorted({(x["query"], x["text_tokens"]) for x in d["rows"]}, key=lambda g: (g[0] != "text", -g[1]))
        med = {(x["query"], x["text_tokens"], x["k"]): x["median_ms"] for x in d["rows"]}
        rows += [(d["config"]["name"], f"{q}, {t} tokens", *(ms(med[(q, t, k)]) for k in ks)) for q, t in groups]
    return table(("reranker", "query", *(f"k={k}" for k in ks)), rows) + \
        note(f"Medians of one batched forward pass over k candidates, {r('fusion_latency')['threads']} thread; "
             "`benchmarks/results/fusion_latency.json`, `fusion_latency_demo.json`.")


def serve_latency(r: Results) -> Lines:
    d = r("serve_load")
    by: dict[str, dict[str, Json]] = {}
    for x in d["latency"]:
        by.setdefault(x["index"], {})[x["path"]] = x
    cell = (lambda x: f"{ms(x['median_ms'])} median, {ms(x['p95_ms'])} p95" if x else "")
    get = (lambda paths, key: next((v for k, v in paths.items() if k.startswith(key)), None))
    rows = []
    for index, paths in by.items():
        if index == "-":
            rows.append(("(`itm-search --help`)", "", "", cell(get(paths, "itm-search --help")), ""))
        else:
            rows.append((index, f"{next(iter(paths.values()))['items']:,}", cell(get(paths, "cold CLI")),
                         cell(get(paths, "warm CLI")), cell(get(paths, "in-process"))))
    rows.sort(key=lambda x: x[0].startswith("("))
    return table(("index", "items", "query from the shell, no server", "with `itm-serve` running",
                  "in a warm process"), rows) + note(source("serve_load", d["machine"]))


def serve_load(r: Results) -> Lines:
    d = r("serve_load")
    rows = [(x["index"], f"{x['items']:,}", f"{x['clients']}, {x['seconds']:.0f}", f1(x["qps"]),
             f"{x['p50_ms']:.0f} ms", f"{x['p95_ms']:.0f} ms", f"{x['p99_ms']:.0f} ms",
             f"{x['unloaded_p95_ms']:.0f} ms ({x['p95_vs_unloaded']:.2f}x)", f"{x['shed_503']:,}", x["errors"],
             f"{x['after_ok']} of {x['after_runs']}, p95 {x['after_p95_ms']:.0f} ms",
             f"{mb(x['rss_before_mb'])}, {mb(x['rss_peak_mb'])}", "yes" if x["cli_output_identical"] else "no")
            for x in d["load"]]
    big = d["large_index"]["ann"]["image"]
    return table(("index", "items", "clients, seconds", "admitted/s", "p50", "p95", "p99",
                  "unloaded p95 (admitted p95 against it)", "turned away (503)", "errors", "answered right after",
                  "server RSS before, peak", "CLI output same bytes as without server"), rows) + \
        note(f"The large index: {d['large_index']['n_images']:,} images synthesized through the commit path in "
             f"{d['large_index']['synthesized_s']:.1f} s, FAISS {big['factory']} with recall@10 "
             f"{big['recall_at_10']:.3f} against exact search. " + source("serve_load", d["machine"]))


# ---------------------------------------------------------------- calibration, near-duplicates, training


def calibration(r: Results) -> Lines:
    d = r("calibration_report")
    rows = []
    for p, x in d["min_prob"].items():
        no, yes = x["unanswerable"], x["answerable"]
        rows.append((p, pct(no["no_match"]), pct(yes["no_match"]), pct(yes["true_lost"]), pct(yes["kept_precision"]),
                     f2(yes["hits_kept"])))
    c = d["calibration"]
    head = ("`--min-prob`", "captions true of no image: \"no match\"", "captions true of some image: \"no match\"",
            "true matches in the top 10 lost", "kept hits that are true", "hits per query")
    return table(head, rows) + \
        note(f"{d['pairs']:,} (query, candidate) pairs, {d['matches']} true; expected calibration error "
             f"{d['ece']['sigmoid']:.4f} as a plain sigmoid, {d['ece']['calibrated']:.4f} calibrated "
             f"(p = sigmoid({c['a']:.3f} x logit + {c['b']:.3f}), {c['method']}); ROC AUC {d['auc']:.3f}; reranker "
             f"`{d['reranker_sha256'][:12]}`. " + source("calibration_report", d["machine"]))


def dedup_threshold(r: Results) -> Lines:
    d = r("dedup_threshold")
    kinds = ("jpeg_q60", "half_size", "crop_6pct", "twin", "distinct")
    rows = [(f"{t}{' (default)' if float(t) == d['default'] else ''}", *(pct(x[k]) for k in kinds))
            for t, x in d["share_at_or_above"].items()]
    return table(("cosine at or above", "JPEG re-save (q60)", "half-size copy", "6% crop", "confusable twin",
                  "distinct images"), rows) + \
        note(f"Share of pairs `--dedup` would collapse; model `{d['model']}`, {d['images']} test images. "
             + source("dedup_threshold", d["machine"]))


TRAIN_STEP = ("train_step", "train_step_feature_cache", "train_step_pairs", "train_step_more_negatives",
              "train_step_token_margin")


def train_step(r: Results) -> Lines:
    rows = []
    for name in TRAIN_STEP:
        d = r(name)
        (a, x), (b, y) = list(d["rows"].items())
        rows.append((f"`{name}.json`", f"{a} / {b}", f"{x['step_s']:.3f} / {y['step_s']:.3f} s",
                     f2(y["step_s"] / x["step_s"]), f"{len(x['each_s'])}", "yes" if d["native_bf16"] else "no",
                     machine(d["machine"])))
    return table(("results", "variants A / B", "step A / B (median)", "B / A", "interleaved runs each",
                  "native bf16", "machine"), rows)


def optimizer_step(r: Results) -> Lines:
    d = r("optimizer_step")
    rows = [(x["parameters"], x["tensors"], f"{x['values']:,}", f"{x['loop_ms']:.2f} ms", f"{x['fused_ms']:.2f} ms",
             f"{x['stage_steps']:,}", f"{x['saved_min']:.1f}") for x in d["rows"]]
    return table(("parameters", "tensors", "values", "AdamW loop", "AdamW fused", "steps of its stages",
                  "minutes saved (estimate)"), rows) + \
        note(f"Medians of {d['repeats']} interleaved runs of {d['steps']} updates. "
             + source("optimizer_step", d["machine"]))


# ---------------------------------------------------------------- the README's headline table


def headline(r: Results) -> Lines:
    q = r("quality_report")["stages"]
    rec, two = q["recall only"]["all"], q["two-stage k=50"]["all"]
    v = {x["work"]: x for x in r("vs_rclip")["rows"]}
    text, noop = v["text query, 300-image index"], v["rebuild with nothing changed, 300 images"]
    build = v["build from scratch, 300 JPEGs 640x480"]
    int8 = v["build from scratch, 300 JPEGs 640x480, itm --precision int8"]
    lat = {(x["index"], x["path"][:4]): x["median_ms"] for x in r("serve_load")["latency"]}
    served = (lambda how: lat[("samples", how)])
    load = r("serve_load")["load"][0]
    sc = r("scale_ondisk_1e7")
    chosen = next(x for x in sc["search"] if x["nprobe"] == sc["chosen_nprobe"])
    link = (lambda anchor: f"[more]({BENCH}#{anchor})")
    rows = [
        ("demo model, text -> image, top image true of the caption (truth@1)", f"{f1(two['t2i_truth1'])}% two-stage",
         f"{f1(rec['t2i_truth1'])}% recall only", link("quality")),
        ("demo model, image -> text, truth@1", f"{f1(two['i2t_truth1'])}% two-stage",
         f"{f1(rec['i2t_truth1'])}% recall only", link("quality")),
        ("text query from the shell, 300-image index, no server", f"{f2(text['itm_s'])} s",
         f"rclip {f2(text['rclip_s'])} s ({f2(text['time_ratio'])}x the time)", link("speed-against-rclip")),
        ("rebuild with nothing changed, 300 images", f"{f2(noop['itm_s'])} s",
         f"rclip {f2(noop['rclip_s'])} s ({f2(noop['time_ratio'])}x)", link("speed-against-rclip")),
        ("build, 300 JPEGs of 640x480, fp32 / `--precision int8`",
         f"{f1(build['itm_rate'])} / {f1(int8['itm_rate'])} images/s",
         f"rclip {f1(build['rclip_rate'])} images/s ({f2(build['rate_ratio'])}x / {f2(int8['rate_ratio'])}x)",
         link("speed-against-rclip")),
        ("query with `itm-serve` running, 600 items",
         f"{ms(served('warm'))} from the shell, {ms(served('in-p'))} in process",
         f"{ms(served('cold'))} without a server; {f1(load['qps'])} queries/s from {load['clients']} clients",
         link("serving")),
        (f"on-disk IVF index of {sc['n']:,} vectors ({sc['factory']})",
         f"{chosen['warm_p50_ms']:.2f} ms a search (warm p50)",
         f"built in {sc['build_s_per_million']:.0f} s per million vectors on {sc['build_threads']} cores",
         link("scale")),
    ]
    return table(("what", "itm", "beside it", ""), rows)


TABLES: dict[str, Callable[[Results], Lines]] = {
    "headline": headline,
    "quality-report": quality_report, "swap-accuracy": swap_accuracy, "twins": twins,
    "quality-by-kind": quality_by_kind, "quality-variants": quality_variants,
    "quality-robustness": quality_robustness, "encoder-robustness": encoder_robustness,
    "region-probe": region_probe, "relation-words": relation_words,
    "vs-rclip": vs_rclip, "build-throughput": build_throughput, "precision": precision, "store-int8": store_int8,
    "query-latency": query_latency, "fusion-latency": fusion_latency,
    "serve-latency": serve_latency, "serve-load": serve_load,
    "calibration": calibration, "dedup-threshold": dedup_threshold,
    "train-step": train_step, "optimizer-step": optimizer_step,
}


# ---------------------------------------------------------------- rewriting and checking documents


def documents(root: Path) -> list[Path]:
    return sorted({p for pattern in DOCUMENTS for p in root.glob(pattern) if p.is_file()})


def regenerate(text: str, results: Results) -> tuple[str, list[str], list[str]]:
    """The text with every marked table regenerated; the tables found, and those whose content changed."""
    found: list[str] = []
    changed: list[str] = []

    def replace(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise SystemExit(f"tables.py: unknown table {name!r}; known: {', '.join(TABLES)}")
        found.append(name)
        try:
            body = "\n".join(TABLES[name](results)) + "\n"
        except (OSError, KeyError, StopIteration) as e:  # a result file missing, or not what its table reads
            raise SystemExit(f"tables.py: cannot make table {name} from {results.folder}: {type(e).__name__}: {e}")
        if body != m.group(3):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return MARKED.sub(replace, text), found, changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table differs from the JSON")
    ap.add_argument("--root", type=Path, default=ROOT, help="folder holding README.md and docs/ (default: the repo)")
    ap.add_argument("--results", type=Path, default=None,
                    help="folder of result JSON (default: ROOT/benchmarks/results)")
    args = ap.parse_args(argv)
    results = Results(args.results or args.root / "benchmarks" / "results")
    stale: list[str] = []
    seen: set[str] = set()
    for path in documents(args.root):
        text = path.read_text(encoding="utf-8")
        new, found, changed = regenerate(text, results)
        rel = path.relative_to(args.root)
        seen.update(found)
        stale += [f"{rel}: table {name} differs from benchmarks/results" for name in changed]
        if changed and not args.check:
            path.write_text(new, encoding="utf-8")
            print(f"{rel}: rewrote {', '.join(changed)}")
    missing = [f"table {name} is in no document under {args.root}" for name in sorted(set(TABLES) - seen)]
    if not args.check:
        for line in missing:
            print(f"warning: {line}", file=sys.stderr)
        return 0
    stale += missing
    for line in stale:
        print(line, file=sys.stderr)
    if stale:
        print("run `python benchmarks/tables.py` to regenerate them", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
