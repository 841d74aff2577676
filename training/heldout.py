"""A held-out split of the synthetic world written as a folder and indexed, with the truth of any caption about it.

What fitting and measuring a reranker's calibration need (training/calibrate.py,
benchmarks/calibration_report.py): images the model never trained on, in an itm index, and
the world's own truth checker to label (caption, image) pairs.

    >>> world = HeldOut.build("val", 300, seed=0, model=resolve_model("demo"), root=Path("/tmp/cal"))
    >>> world.is_true("a red circle left of a blue square", hit)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from itm.data.synth.captions import caption_matches, parse_caption
from itm.data.synth.dataset import Sample, generate_split
from itm.indexer.build import BuildOptions, build_index
from itm.models.registry import ModelSpec


@dataclass
class HeldOut:
    samples: list[Sample]
    index_dir: Path
    by_path: dict[str, Sample]  # image path (as hits give it) -> its sample

    @classmethod
    def build(cls, split: str, n_images: int, seed: int, model: ModelSpec, root: Path, start: int = 0) -> HeldOut:
        """Render images [start, start + n_images) of `split` into root/images and index them into root/idx."""
        samples = generate_split(split, start + n_images, seed, start=start)
        folder = Path(root) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for s in samples:
            s.render().save(folder / f"{s.image_id}.png")
        build_index(folder, Path(root) / "idx", model, BuildOptions(workers=1))
        return cls(samples, Path(root) / "idx", {os.path.realpath(folder / f"{s.image_id}.png"): s for s in samples})

    def is_true(self, caption: str, hit) -> bool:
        """Does `caption` describe the image of `hit`, by the world's parser and truth checker?"""
        return caption_matches(self.by_path[os.path.realpath(hit.path)].scene, parse_caption(caption))

    def answerable(self, caption: str) -> bool:
        """Is `caption` true of at least one indexed image?"""
        parts = parse_caption(caption)
        return any(caption_matches(s.scene, parts) for s in self.samples)

    def query_mix(self, n: int) -> list[str]:
        """Half true captions of the indexed images, half their hard negatives (false of their own image), in a
        fixed order: the mix of questions whose answer is yes somewhere and those whose answer may be no."""
        true = [c for s in self.samples for c in s.captions]
        false = [c for s in self.samples for c in s.hard_negatives]
        step_t, step_f = max(1, len(true) // (n // 2)), max(1, len(false) // (n - n // 2))
        return true[::step_t][:n // 2] + false[::step_f][:n - n // 2]
