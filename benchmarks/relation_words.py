"""How far apart dual encoders' text towers keep each pair of relation words, where the reranker reads them.

    python benchmarks/relation_words.py data/demo/encoder.safetensors W/encoders/best/encoder.safetensors

For each `itm-demo` encoder checkpoint and each val caption with a relation flip (the split that
`training/recipes/demo.py --stage data` writes), the largest cosine distance between the caption's and
the flip's features at any real token, at each text layer the `fusion-demo` reranker reads
(`pair_distances` in the recipe; the recipe's check_relation_words averages its largest over the
layers). Printed per pair of relation words ("left"/"right", "above"/"below", ...): the mean and the
5th percentile over the captions, per layer. A tower that keeps one pair 0.01 apart gives the
reranker next to nothing to read that relation from. Results: benchmarks/results/relation_words.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import benchlib

ROOT = Path(__file__).resolve().parents[1]

from itm.models.encoder import DualEncoder
from itm.models.fusion import get_fusion_config
from itm.models.registry import resolve_model
from itm.training.recipes.demo import STAGE2, pair_distances, relation_pairs

DATASET = ROOT / "data" / "demo" / "work" / "synth" / "dataset_karpathy.json"


def flipped_words(a: str, b: str) -> str:
    """The words that tell a caption from its flip, sorted: "left/right"."""
    wa, wb = a.split(), b.split()
    return "/".join(sorted({w for w in wa if w not in wb} | {w for w in wb if w not in wa}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", type=Path, nargs="+", help="itm-demo encoder checkpoints (encoder.safetensors)")
    ap.add_argument("--dataset", type=Path, default=DATASET, help="the recipe's dataset (train_demo.py --stage data)")
    ap.add_argument("--out", type=Path, default=benchlib.default_out(__file__))
    args = ap.parse_args()
    if not args.dataset.is_file():
        sys.exit(f"{args.dataset} not found: run `python training/recipes/demo.py --stage data` first")
    facts = benchlib.machine_facts()
    pairs = relation_pairs(args.dataset)
    groups = defaultdict(list)
    for i, (a, b) in enumerate(pairs):
        groups[flipped_words(a, b)].append(i)
    results = {}
    for path in args.checkpoints:
        enc = DualEncoder.load(resolve_model("itm-demo", checkpoint=path))
        layers = get_fusion_config(STAGE2.fusion, image_width=enc.image_width, text_width=enc.text_width).text_layers
        far = pair_distances(enc, pairs, layers)  # (layers, pairs)
        rows = {"all": far, **{words: far[:, idx] for words, idx in sorted(groups.items())}}
        results[str(path)] = {words: {"pairs": d.shape[1], "mean": [round(float(x), 4) for x in d.mean(1)],
                                      "p5": [round(float(x), 4) for x in d.quantile(0.05, dim=1)],
                                      "largest_over_layers_mean": round(float(d.amax(0).mean()), 4)}
                              for words, d in rows.items()}
        print(f"{path} (text layers {list(layers)}):")
        for words, r in results[str(path)].items():
            print(f"  {words:14s} {r['pairs']:5d} pairs  mean {' '.join(f'{x:.3f}' for x in r['mean'])}  "
                  f"p5 {' '.join(f'{x:.3f}' for x in r['p5'])}  largest over layers {r['largest_over_layers_mean']:.3f}")
    facts = benchlib.finish(facts)
    print(benchlib.describe_machine(facts))
    benchlib.write_json(args.out, {"encoders": results, "machine": facts, "finished_at": time.strftime("%F %T")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
