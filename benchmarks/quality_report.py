"""Quality report on the synthetic compositional test split, against what the split allows.

    python benchmarks/quality_report.py                     # the bundled demo model, seed-0 test split
    python benchmarks/quality_report.py --seed 1            # another seed's test split
    python benchmarks/quality_report.py --dataset DIR/dataset_karpathy.json --model demo
    python benchmarks/quality_report.py --image-precision int8 --out benchmarks/results/quality_report_int8.json

The test split of a seed is generated on first use under data/demo/work/test-seed{N}/ (1,000
images x 5 captions, as the demo recipe's world draws them; the recipe itself never writes one).

Prints tables and writes JSON (benchmarks/results/quality_report.json):

- Recall@1/5/10 both ways (standard protocol, 5 captions per image) for recall only and
  two-stage at each --rerank-k, beside the oracle ceiling: an oracle that knows which images
  make each caption true and ranks them first, ties broken at random (expected values).
- Truth-aware figures, whose ceiling is 100: text->image truth@1 and truth@5 (the top image, or
  one of the top 5, makes the caption true), image->text truth@1 (the top caption is true of
  the image), by the world's own parser and truth checker.
- Swap accuracy (true caption outscores its hard negative on its image), by the kind of hard
  negative, for the dual encoder and for the fused score.
- Twins: for each caption of an image that has a confusable twin in the split (colours or
  positions of two objects exchanged), how often each stage ranks the image above its twin.
- t2i truth@1 by kind of caption (one, two or three objects; with a position or relation or
  not), and why the top image is false where it is: the objects are there but not where said,
  or the attributes are there on other objects (binding), or one attribute (size, shape,
  colour) is wrong, or several.
- "held-out" rows restrict the queries to images with a colour-shape pair never seen in training.

With --image-precision int8 the images (embeddings and rerank-store features) are encoded as
`itm-index build --precision int8` encodes them (the onnx backend's int8 graphs) and the texts as
a default query is (fp32): what int8 costs in answers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from itm.data.synth.captions import WHY_FALSE, caption_kind, parse_caption, truth_table, why_false
from itm.data.synth.prepare import prepare, scene_from_dict
from itm.models.encoder import DualEncoder
from itm.models.fusion_checkpoint import load_reranker
from itm.models.item_encoder import ItemEncoder, Runtime
from itm.models.loading import load_item_encoder
from itm.models.registry import resolve_model
from itm.training.data import load_dataset
from itm.training.evaluate import embed_dataset, oracle_recall, pair_wins, rank, recall, swap_accuracy, truth_recall

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "data" / "demo" / "work"
TEST_IMAGES = 1000


def test_split(seed: int, work: Path = WORK) -> Path:
    """The Karpathy JSON of seed `seed`'s test split, generated the first time it is asked for."""
    dataset = work / f"test-seed{seed}" / "dataset_karpathy.json"
    if not dataset.exists():
        prepare(dataset.parent, {"test": TEST_IMAGES}, seed, image_size=64, captions_per_image=5, workers=2)
    return dataset


def split_meta(dataset: Path, data) -> dict:
    """Scenes, held-out flags, twins, negatives and their kinds of the evaluated images, in data order."""
    meta = {(dataset.parent / im["filepath"] / im["filename"]).resolve(): im
            for im in json.loads(dataset.read_text())["images"]}
    ims = [meta[d.image] for d in data]
    if any("scene" not in im for im in ims):
        raise SystemExit(f"{dataset} has no scenes; regenerate it with `python -m itm.data.synth.prepare`")
    where = {(im["filepath"], im["filename"]): i for i, im in enumerate(ims)}
    return {
        "scenes": [scene_from_dict(im["scene"]) for im in ims],
        "held_out": np.array([bool(im.get("held_out")) for im in ims]),
        "twin": np.array([where.get((im["filepath"], im["twin"]), -1) if im.get("twin") else -1 for im in ims]),
        "twin_kind": [im.get("twin_kind") for im in ims],
        "negatives": [s.get("negative") for im in ims for s in im["sentences"]],
        "negative_kinds": [s.get("negative_kind") for im in ims for s in im["sentences"]],
    }


def evaluate_split(encoder: DualEncoder, reranker, dataset: Path, rerank_ks=(10, 50), split: str = "test",
                   images: ItemEncoder | None = None) -> dict:
    """Every figure of the report for the test split of `dataset`; with `images`, the images' features
    are that item encoder's."""
    data = load_dataset(dataset, split=split)
    m = split_meta(dataset, data)
    feats = embed_dataset(encoder, reranker, data)
    if images is not None:
        feats = replace(feats, **encode_images(images, data))
    truth = truth_table(feats.texts, m["scenes"])  # (Nt, Ni)
    held, owner = m["held_out"], feats.caption_image
    subsets = {"all": (None, None), "held_out": (held[owner], held)}
    out = {"images": len(data), "held_out_images": int(held.sum()), "captions": len(feats.texts),
           "oracle": {name: oracle_recall(truth, owner, queries=q, images=i) for name, (q, i) in subsets.items()},
           "stages": {}, "twins": {}}
    # twins: every caption of an image whose twin is in the split, against that twin
    has_twin = m["twin"][owner] >= 0
    twin_q = np.flatnonzero(has_twin)
    twin_kind = np.array([m["twin_kind"][owner[q]] for q in twin_q])
    out["twins"]["captions"] = int(len(twin_q))
    parts = [parse_caption(t) for t in feats.texts]
    kinds = np.array([caption_kind(p) for p in parts])
    out["by_kind"], out["by_kind_held_out"] = {}, {}
    own_held = held[owner]  # the caption's own image holds a colour-shape pair that training never saw
    for name, k in [("recall only", 0)] + [(f"two-stage k={k}", k) for k in rerank_ks]:
        r = rank(feats, reranker, k) if k else rank(feats)
        out["stages"][name] = {
            sub: recall(r, images=i, caption_image=owner) | truth_recall(r, truth, q, i)
            for sub, (q, i) in subsets.items()}
        wins = pair_wins(r.t2i_order, twin_q, owner[twin_q], m["twin"][owner[twin_q]])
        out["twins"][name] = {"all": 100 * float(wins.mean()),
                              **{kind: 100 * float(wins[twin_kind == kind].mean()) for kind in sorted(set(twin_kind))}}
        top = r.t2i_order[:, 0]
        out["by_kind"][name] = truth_by_kind(top, truth, parts, kinds, m["scenes"])
        out["by_kind_held_out"][name] = {
            sub: truth_by_kind(top[sel], truth[sel], [parts[i] for i in np.flatnonzero(sel)], kinds[sel], m["scenes"])
            for sub, sel in (("without", ~own_held), ("with", own_held)) if sel.any()}
    dual, fused = swap_accuracy(encoder, reranker, feats, m["negatives"])
    with_neg = np.array([n is not None for n in m["negatives"]])
    kinds = np.array(m["negative_kinds"], dtype=object)[with_neg]
    held_pairs = held[owner[with_neg]]
    out["swap"] = {"pairs": int(with_neg.sum())}
    for stage, ok in (("dual", dual), ("fusion", fused)):
        if ok is None:
            continue
        row = {"all": 100 * float(ok.mean()), "held_out": 100 * float(ok[held_pairs].mean())}
        row |= {kind: 100 * float(ok[kinds == kind].mean()) for kind in sorted(set(kinds))}
        out["swap"][stage] = row
    out["swap"]["count"] = {kind: int((kinds == kind).sum()) for kind in sorted(set(kinds))}
    return out


def encode_images(encoder: ItemEncoder, data, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Features' image fields, encoded by an item encoder (as a build encodes them)."""
    emb, store = [], []
    for s in range(0, len(data), batch_size):
        out = encoder.encode_images(np.stack([encoder.load_pixels(d.image) for d in data[s:s + batch_size]]))
        emb.append(torch.from_numpy(out.emb))
        if out.tok is not None:  # a model without a reranker has no store
            store.append(torch.from_numpy(out.tok))
    return {"image_emb": torch.cat(emb), "image_store": torch.cat(store) if store else None}


def truth_by_kind(top: np.ndarray, truth: np.ndarray, parts: list, kinds: np.ndarray, scenes: list) -> dict:
    """Per kind of caption ("all" for every caption): how many, t2i truth@1, and why the top image is false
    where it is (why_false's answers), each in % of that kind's captions."""
    hit = truth[np.arange(len(top)), top]
    why = np.array(["" if ok else why_false(scenes[j], p) for ok, j, p in zip(hit, top, parts)])
    out = {}
    for kind in ["all", *sorted(set(kinds))]:
        sel = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
        out[kind] = {"captions": int(sel.sum()), "truth1": 100 * float(hit[sel].mean()),
                     "false": {w: 100 * float((why[sel] == w).mean()) for w in WHY_FALSE}}
    return out


def print_report(r: dict) -> None:
    print(f"{r['images']} test images ({r['held_out_images']} with held-out combinations), {r['captions']} captions")
    head = f"{'':16} {'subset':9} {'t2i R@1':>8} {'R@5':>6} {'R@10':>6}  {'i2t R@1':>8} {'R@5':>6} {'R@10':>6}  " \
           f"{'RSUM':>6}  {'t2i truth@1':>11} {'truth@5':>7}  {'i2t truth@1':>11}"
    print(head)
    rows = [("oracle", sub, {**x, "t2i_truth1": 100.0, "t2i_truth5": 100.0, "i2t_truth1": 100.0})
            for sub, x in r["oracle"].items()]
    rows += [(name, sub, x) for name, subs in r["stages"].items() for sub, x in subs.items()]
    for name, sub, x in rows:
        print(f"{name:16} {sub:9} {x['t2i_r1']:8.1f} {x['t2i_r5']:6.1f} {x['t2i_r10']:6.1f}  {x['i2t_r1']:8.1f} "
              f"{x['i2t_r5']:6.1f} {x['i2t_r10']:6.1f}  {x['rsum']:6.1f}  {x['t2i_truth1']:11.1f} "
              f"{x['t2i_truth5']:7.1f}  {x['i2t_truth1']:11.1f}")
    s = r["swap"]
    kinds = list(s["count"])
    print(f"\nswap accuracy, % of {s['pairs']} caption/negative pairs")
    print(f"{'':8} {'all':>6} {'held-out':>9} " + " ".join(f"{k:>14}" for k in kinds))
    print(f"{'(pairs)':8} {s['pairs']:6d} {'':9} " + " ".join(f"{s['count'][k]:14d}" for k in kinds))
    for stage in ("dual", "fusion"):
        if stage in s:
            x = s[stage]
            print(f"{stage:8} {x['all']:6.1f} {x['held_out']:9.1f} " + " ".join(f"{x[k]:14.1f}" for k in kinds))
    print("\nt2i truth@1 by kind of caption, and the top image false because of (% of the kind's captions):")
    print(f"{'':16} {'kind':24} {'captions':>8} {'truth@1':>7} " + " ".join(f"{w:>7}" for w in WHY_FALSE))
    for name, x in r["by_kind"].items():
        for kind, v in x.items():
            print(f"{name:16} {kind:24} {v['captions']:8d} {v['truth1']:7.1f} "
                  + " ".join(f"{v['false'][w]:7.1f}" for w in WHY_FALSE))
    print("\nt2i truth@1 by kind of caption, for captions of images without / with a held-out combination:")
    print(f"{'':16} {'kind':24} {'captions':>8} {'truth@1':>7}  {'captions':>8} {'truth@1':>7}")
    for name, x in r["by_kind_held_out"].items():
        for kind in dict.fromkeys([*x.get("without", {}), *x.get("with", {})]):
            cells = [x.get(sub, {}).get(kind) for sub in ("without", "with")]
            print(f"{name:16} {kind:24} "
                  + "  ".join(f"{c['captions']:8d} {c['truth1']:7.1f}" if c else f"{0:8d} {'-':>7}" for c in cells))
    t = r["twins"]
    print(f"\ntwins: % of {t['captions']} captions whose image is ranked above its confusable twin")
    for name, x in t.items():
        if name != "captions":
            print(f"{name:16} " + "  ".join(f"{k} {v:.1f}" for k, v in x.items()))


def load_models(model: str, checkpoint: Path | None, reranker: Path | None):
    spec = resolve_model(model, None, checkpoint, reranker)
    return DualEncoder.load(spec), load_reranker(spec.reranker)


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, help="a Karpathy JSON with scenes (default: the --seed test split)")
    ap.add_argument("--seed", type=int, default=0, help="world seed of the generated test split")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--reranker", type=Path)
    ap.add_argument("--rerank-k", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--image-precision", choices=["fp32", "int8"], default="fp32",
                    help="int8: encode the images with the onnx backend's int8 graphs, as a build with it does")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality_report.json")
    args = ap.parse_args()
    if args.dataset is None:
        args.dataset = test_split(args.seed)
    elif not args.dataset.exists():
        raise SystemExit(f"{args.dataset} not found")
    t0 = time.time()
    encoder, reranker = load_models(args.model, args.checkpoint, args.reranker)
    images = None
    if args.image_precision != "fp32":
        spec = resolve_model(args.model, None, args.checkpoint, args.reranker)
        images = load_item_encoder(spec, Runtime(precision=args.image_precision, threads=torch.get_num_threads()))
    r = evaluate_split(encoder, reranker, args.dataset, args.rerank_k, images=images)
    print_report(r)
    dataset = args.dataset.relative_to(ROOT) if args.dataset.is_relative_to(ROOT) else args.dataset
    report = {"dataset": str(dataset), "model": args.model, "image_precision": args.image_precision, **r,
              "machine": machine(),
              "seconds": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
