"""Regenerate the bundled sample corpus in this folder.

    python -m itm.data.samples.make_samples          # from the repository root

Writes images/*.png (300 test-style 64 px images: held-out colour-shape pairs and
confusable twins included), captions.txt (one caption per image, the text corpus
the quickstart indexes) and samples.jsonl (every caption, hard negative and twin).
"""
from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_IMAGES = 300
SEED = 7

from itm.data.synth.prepare import write_samples


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Regenerate the bundled sample corpus.")
    p.add_argument("--out", type=Path, default=HERE, help="output directory (default: this folder)")
    p.add_argument("--n", type=int, default=N_IMAGES, help="number of images")
    p.add_argument("--seed", type=int, default=SEED)
    a = p.parse_args(argv)
    samples = write_samples(a.out, a.n, a.seed)
    twins = sum(s.twin_id is not None for s in samples)
    held = sum(s.held_out for s in samples)
    print(f"wrote {len(samples)} images, {len(samples)} captions ({held} held-out, {twins} twins) to {a.out}")


if __name__ == "__main__":
    main()
