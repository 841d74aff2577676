"""Is the reranker's probability of match calibrated, and does `--min-prob` answer "no match" when it should?

    python benchmarks/calibration_report.py [--model demo] [--images 300] [--queries 300] [--rerank-k 50] [-k 10]
        [--out benchmarks/results/calibration_report.json]

On held-out images of the synthetic world (the test split, which neither training nor the
calibration saw), indexed with the model:

- Reliability: for every query, its top --rerank-k recalled images are judged by the reranker and
  labelled by the world's truth checker. Pairs are binned by predicted probability (10 bins), as a
  plain sigmoid of the match logit and as calibrated; the expected calibration error (ECE) of each,
  and a reliability diagram (PNG beside the JSON).
- Two kinds of text query: captions true of some indexed image ("answerable": the true captions of
  indexed images), and captions true of no indexed image ("unanswerable": hard negatives and
  captions of other test images, kept when the checker finds no indexed image they are true of).
  For each --min-prob P: the share of unanswerable queries itm answers "no match" (no hit passes),
  the share of answerable ones it wrongly answers "no match", how many of the true matches that
  the top -k held without a cut the cut loses, and the share of kept hits that are true.
  The row for P = 0.5 is also run through `Searcher.search(refine=Refine(min_prob=0.5))` itself and
  must agree.

The calibration used is the one stored beside the model's reranker (`itm-calibrate`), when it was
fitted for that very checkpoint; otherwise one is fitted here on the val split with itm-calibrate's
defaults, and the JSON says so.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]

from itm.data.synth import generate_split
from itm.models import calibration
from itm.models.registry import resolve_model
from itm.retrieval.query import Refine
from itm.retrieval.search import Searcher
from itm.training.calibrate import candidate_pairs
from itm.training.heldout import HeldOut

import benchlib

THRESHOLDS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def query_sets(world: HeldOut, others: list, n: int) -> dict[str, list[str]]:
    """Answerable captions (true of an indexed image) and unanswerable ones (true of none), n of each at most."""
    answerable = [c for s in world.samples for c in s.captions][::5][:n]
    candidates = [c for s in world.samples for c in s.hard_negatives] + [c for s in others for c in s.captions]
    seen, unanswerable = set(), []
    for c in candidates:
        if c not in seen and not world.answerable(c):
            unanswerable.append(c)
        seen.add(c)
    step = max(1, len(unanswerable) // n)
    return {"answerable": answerable, "unanswerable": unanswerable[::step][:n]}


def judged(searcher: Searcher, world: HeldOut, queries: list[str], rerank_k: int) -> list[dict]:
    """Per query: its top rerank_k candidates in fused-score order, with logit, probability and truth."""
    out = []
    for q in queries:
        hits = searcher.search(text=q, k=rerank_k, rerank_k=rerank_k)
        out.append({"query": q, "ids": [h.id for h in hits], "logit": np.array([h.match_logit for h in hits]),
                    "prob": np.array([h.probability for h in hits]),
                    "true": np.array([world.is_true(q, h) for h in hits], bool)})
    return out


def cut_figures(rows: list[dict], p: float, k: int) -> dict[str, float]:
    """What --min-prob p does to -k k answers, from the judged candidates."""
    no_match, lost, had, kept, kept_true = 0, 0, 0, 0, 0
    for r in rows:
        passing = np.flatnonzero(r["prob"] >= p)[:k]  # candidates stay in fused-score order
        no_match += len(passing) == 0
        top = set(np.flatnonzero(r["true"][:k]))
        had += len(top)
        lost += len(top - set(passing))
        kept += len(passing)
        kept_true += int(r["true"][passing].sum())
    n = max(len(rows), 1)
    return {"no_match": no_match / n, "true_lost": lost / max(had, 1), "true_in_top_k": had,
            "kept_precision": kept_true / kept if kept else None, "hits_kept": kept / n}


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a true pair's logit beats a false pair's (ties count half)."""
    _, which, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[which]  # 1-based ranks, tied values sharing their mean
    pos, neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def reliability_png(path: Path, before: list[dict], after: list[dict], ece_before: float, ece_after: float) -> None:
    """Two reliability diagrams side by side: observed share of matches per predicted-probability bin."""
    w, h, pad = 360, 360, 40
    im = Image.new("RGB", (2 * w + 3 * pad, h + 2 * pad + 20), "white")
    d = ImageDraw.Draw(im)
    for i, (bins, title) in enumerate(((before, f"plain sigmoid, ECE {ece_before:.3f}"),
                                       (after, f"calibrated, ECE {ece_after:.3f}"))):
        x0, y0 = pad + i * (w + pad), pad + 10
        d.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        d.line([x0, y0 + h, x0 + w, y0], fill=(160, 160, 160))  # perfect calibration
        for b in bins:
            if not b["n"]:
                continue
            bx0, bx1 = x0 + b["lo"] * w + 2, x0 + b["hi"] * w - 2
            d.rectangle([bx0, y0 + h - b["observed"] * h, bx1, y0 + h], fill=(70, 110, 200))
            d.text((bx0, y0 + h + 4), str(b["n"]), fill="black")
            yp = y0 + h - b["predicted"] * h
            d.line([bx0, yp, bx1, yp], fill=(220, 40, 40), width=2)
        d.text((x0, y0 - 14), title + " (bars: observed, red: predicted)", fill="black")
    d.text((pad, h + pad + 28), "x: predicted probability in 10 bins (pairs per bin below); y: share that match",
           fill="black")
    im.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--images", type=int, default=300, help="test images indexed")
    ap.add_argument("--queries", type=int, default=300, help="queries of each kind, at most")
    ap.add_argument("--rerank-k", type=int, default=50)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = ap.parse_args()
    facts = benchlib.machine_facts()
    t0 = time.perf_counter()
    spec = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="itm-calreport-") as tmp:
        world = HeldOut.build("test", args.images, 0, spec, Path(tmp) / "test")
        searcher = Searcher(world.index_dir, model=spec)
        cal, source = searcher.calibration, "stored beside the reranker"
        if not cal.calibrated:  # fit one as itm-calibrate would, on the val split
            val = HeldOut.build("val", 300, 0, spec, Path(tmp) / "val")
            logits, labels = candidate_pairs(Searcher(val.index_dir, model=spec), val.query_mix(600), val.is_true,
                                             args.rerank_k)
            cal = calibration.fit(logits, labels, searcher.reranker_sha256)
            searcher.calibration, source = cal, "fitted by this script on the val split (none was stored)"
        others = generate_split("test", 2 * args.images, 0, start=args.images)  # not indexed
        sets = query_sets(world, others, args.queries)
        rows = {name: judged(searcher, world, qs, args.rerank_k) for name, qs in sets.items()}
        pairs = [r for rs in rows.values() for r in rs]
        logits = np.concatenate([r["logit"] for r in pairs])
        truth = np.concatenate([r["true"] for r in pairs])
        raw, calibrated = calibration.UNCALIBRATED.probability(logits), cal.probability(logits)
        cuts = {str(p): {name: cut_figures(rs, p, args.k) for name, rs in rows.items()} for p in THRESHOLDS}
        check = {name: sum(not searcher.search(text=q, k=args.k, rerank_k=args.rerank_k, refine=Refine(min_prob=0.5))
                           for q in qs) / max(len(qs), 1) for name, qs in sets.items()}
    result = {
        "model": args.model, "reranker_sha256": searcher.reranker_sha256, "calibration": {
            "source": source, "a": cal.a, "b": cal.b, "method": cal.method, "fitted_on": cal.fitted_on},
        "settings": {"images": args.images, "queries": {n: len(q) for n, q in sets.items()},
                     "rerank_k": args.rerank_k, "k": args.k, "split": "test", "seed": 0},
        "pairs": int(len(truth)), "matches": int(truth.sum()),
        "ece": {"sigmoid": calibration.ece(raw, truth), "calibrated": calibration.ece(calibrated, truth)},
        "auc": auc(logits, truth),  # how well the logit separates true from false pairs, whatever the calibration
        "reliability": {"sigmoid": calibration.reliability(raw, truth),
                        "calibrated": calibration.reliability(calibrated, truth)},
        "min_prob": cuts, "no_match_at_0.5_by_searcher": check,
        "seconds": time.perf_counter() - t0, "machine": benchlib.finish(facts),
    }
    png = args.out.with_name("calibration_reliability.png")
    reliability_png(png, result["reliability"]["sigmoid"], result["reliability"]["calibrated"],
                    result["ece"]["sigmoid"], result["ece"]["calibrated"])
    benchlib.write_json(args.out, result)
    print_report(result, png)


def print_report(r: dict, png: Path) -> None:
    print(benchlib.describe_machine(r["machine"]))
    s, c = r["settings"], r["calibration"]
    print(f"model {r['model']} (reranker {r['reranker_sha256'][:12]}), calibration {c['source']}: "
          f"p = sigmoid({c['a']:.3f} * logit + {c['b']:.3f})")
    print(f"test split: {s['images']} images indexed, {s['queries']['answerable']} answerable and "
          f"{s['queries']['unanswerable']} unanswerable caption queries, top {s['rerank_k']} judged, -k {s['k']}")
    print(f"{r['pairs']} (query, candidate) pairs, {r['matches']} true; ECE plain sigmoid "
          f"{r['ece']['sigmoid']:.4f}, calibrated {r['ece']['calibrated']:.4f}  ({png}); ROC AUC of the logit "
          f"{r['auc']:.3f}")
    print()
    print(f"{'--min-prob':>10}  {'unanswerable: no match':>22}  {'answerable: no match':>20}  "
          f"{'true matches lost':>17}  {'kept hits true':>14}  {'hits/query':>10}")
    for p, x in r["min_prob"].items():
        u, a = x["unanswerable"], x["answerable"]
        precision = f"{100 * a['kept_precision']:13.1f}%" if a["kept_precision"] is not None else f"{'-':>14}"
        print(f"{p:>10}  {100 * u['no_match']:21.1f}%  {100 * a['no_match']:19.1f}%  {100 * a['true_lost']:16.1f}%  "
              f"{precision}  {a['hits_kept']:10.2f}")
    chk = r["no_match_at_0.5_by_searcher"]
    print(f"\nthrough Searcher.search(min_prob=0.5): 'no match' for {100 * chk['unanswerable']:.1f}% of unanswerable, "
          f"{100 * chk['answerable']:.1f}% of answerable queries ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
