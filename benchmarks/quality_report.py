"""Quality report on the synthetic compositional test split: recall-only vs two-stage, and swap accuracy.

    python benchmarks/quality_report.py                     # the bundled demo model on data/demo/work/synth
    python benchmarks/quality_report.py --dataset DIR/dataset_karpathy.json --model demo

Prints a table and writes JSON (benchmarks/results/quality_report.json). Recall follows the
standard protocol (5 captions per image); "held-out" restricts the queries to test images that
contain a colour-shape combination never seen in training. Swap accuracy is how often an
image's true caption outscores its hard negative (binding swap or relation flip).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from indexer.encoder import DualEncoder
from indexer.models import resolve_model
from retrieval.checkpoint import load_reranker
from retrieval.data import load_dataset
from retrieval.evaluate import embed_dataset, rank, recall

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = ROOT / "data" / "demo" / "work" / "synth" / "dataset_karpathy.json"


def swap_accuracy(encoder, reranker, dataset: Path, data, feats) -> dict[str, float]:
    """Pairs (image, true caption) against (image, hard negative), scored by each stage."""
    meta = {Path(dataset.parent, im["filepath"], im["filename"]).resolve(): im
            for im in json.loads(dataset.read_text())["images"] if im["split"] == "test"}
    negatives = [s.get("negative") for item in data for s in meta[item.image]["sentences"]]
    keep = np.array([n is not None for n in negatives])
    negs = [n for n in negatives if n is not None]
    owner = torch.from_numpy(feats.caption_image[keep])
    out = encoder.encode_texts(negs, reranker.cfg.text_layers)
    img_emb = feats.image_emb[owner]
    pos_sim = (img_emb * feats.text_emb[torch.from_numpy(keep)]).sum(-1)
    neg_sim = (img_emb * out.embeddings).sum(-1)
    with torch.inference_mode():
        neg_store, neg_mask = reranker.encode_text_store(out.tokens, out.mask)
        idx = torch.from_numpy(np.flatnonzero(keep))
        pos_logit = reranker(feats.image_store[owner], feats.text_store[idx], feats.text_mask[idx])
        neg_logit = reranker(feats.image_store[owner], neg_store.half(), neg_mask)
    held = np.array([meta[data[i].image].get("held_out", False) for i in feats.caption_image[keep]])
    res = {}
    for name, sel in (("all", np.ones_like(held)), ("held_out", held)):
        sel_t = torch.from_numpy(sel)
        res[f"dual_{name}"] = 100 * float((pos_sim > neg_sim)[sel_t].float().mean())
        res[f"fusion_{name}"] = 100 * float((reranker.score(pos_logit, pos_sim) >
                                              reranker.score(neg_logit, neg_sim))[sel_t].float().mean())
    res["pairs"] = int(keep.sum())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--reranker", type=Path)
    ap.add_argument("--rerank-k", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality_report.json")
    args = ap.parse_args()
    if not args.dataset.exists():
        raise SystemExit(f"{args.dataset} not found; make it with `python data/demo/train_demo.py --stage data`")
    t0 = time.time()
    spec = resolve_model(args.model, None, args.checkpoint, args.reranker)
    encoder = DualEncoder.load(spec)
    reranker = load_reranker(spec.reranker)
    data = load_dataset(args.dataset, split="test")
    feats = embed_dataset(encoder, reranker, data)
    meta = {Path(args.dataset.parent, im["filepath"], im["filename"]).resolve(): im.get("held_out", False)
            for im in json.loads(args.dataset.read_text())["images"]}
    held = np.array([meta[d.image] for d in data])
    rows = {}
    for name, k in [("recall only", 0)] + [(f"two-stage k={k}", k) for k in args.rerank_k]:
        r = rank(feats, reranker, k) if k else rank(feats)
        rows[name] = {"all": recall(r), "held_out": recall(r, images=held, caption_image=feats.caption_image)}
    swaps = swap_accuracy(encoder, reranker, args.dataset, data, feats)
    print(f"{len(data)} test images ({held.sum()} with held-out combinations), {len(feats.texts)} captions")
    print(f"{'':16} {'subset':9} {'t2i R@1':>8} {'R@5':>6} {'R@10':>6}  {'i2t R@1':>8} {'R@5':>6} {'R@10':>6}  {'RSUM':>6}")
    for name, subsets in rows.items():
        for sub, r in subsets.items():
            print(f"{name:16} {sub:9} {r['t2i_r1']:8.1f} {r['t2i_r5']:6.1f} {r['t2i_r10']:6.1f}  "
                  f"{r['i2t_r1']:8.1f} {r['i2t_r5']:6.1f} {r['i2t_r10']:6.1f}  {r['rsum']:6.1f}")
    print(f"swap accuracy ({swaps['pairs']} caption/negative pairs): dual encoder {swaps['dual_all']:.1f}% "
          f"(held-out {swaps['dual_held_out']:.1f}%), fusion {swaps['fusion_all']:.1f}% "
          f"(held-out {swaps['fusion_held_out']:.1f}%)")
    report = {"dataset": str(args.dataset.relative_to(ROOT) if args.dataset.is_relative_to(ROOT) else args.dataset),
              "model": args.model, "images": len(data), "held_out_images": int(held.sum()),
              "captions": len(feats.texts), "recall": rows, "swap_accuracy": swaps,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads()},
              "seconds": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
