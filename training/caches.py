"""What training keeps in memory between steps: prepared (and degraded) training images, and the frozen
encoders' features of every image and text."""
from __future__ import annotations

import io
import random
from pathlib import Path

import torch
from PIL import Image

from itm.common.errors import DecodeError
from itm.common.parallel import ordered_map
from itm.indexer.changes import content_hash
from itm.models.encoder import DualEncoder, Encoded
from itm.models.images import load_image, read_file

AUGMENT_VARIANTS = 3  # degraded copies made of each training image, when augmenting


def degrade(image: Image.Image, rng: random.Random) -> bytes:
    """A mildly degraded copy of an image, as JPEG bytes: half the time shrunk to 1/2..1 of its side
    (bicubic or bilinear), then re-encoded at a JPEG quality of 40..95, as photos are when shared."""
    if rng.random() < 0.5:
        scale = rng.uniform(0.5, 1.0)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, rng.choice((Image.Resampling.BICUBIC, Image.Resampling.BILINEAR)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=rng.randint(40, 95))
    return out.getvalue()


class ImageCache:
    """Decoded, preprocessed training images, kept in memory as fp16 (small datasets fit); with
    `variants`, that many degraded copies of each image too, each made once, when first drawn."""

    def __init__(self, encoder: DualEncoder, workers: int, on_skip, max_items: int = 50_000, variants: int = 0):
        self.encoder, self.workers, self.on_skip, self.max_items = encoder, workers, on_skip, max_items
        self.variants = variants
        self.cache: dict[Path, torch.Tensor | None] = {}
        self.files: dict[Path, bytes] = {}
        self.degraded: dict[tuple[Path, int], torch.Tensor] = {}
        self.skipped: list[str] = []

    def _load(self, path: Path) -> torch.Tensor | None:
        try:
            raw = read_file(path)
            x = self.encoder.load_pixels(raw).half()
        except DecodeError as e:
            self.skipped.append(str(path))
            if self.on_skip:
                self.on_skip(str(path), str(e))
            return None
        if self.variants and len(self.files) < self.max_items:
            self.files[path] = raw
        return x

    def _degrade(self, key: tuple[Path, int]) -> torch.Tensor | None:
        path, variant = key
        try:
            raw = self.files.get(path) or read_file(path)
            # seeded by the file's bytes, not its path: the same copy whenever and wherever it is made,
            # so that resumed runs, and runs on the data at another place, repeat
            rng = random.Random(f"{content_hash(raw)}/{variant}")
            image = load_image(raw, min_side=self.encoder.image_size)
            return self.encoder.load_pixels(degrade(image, rng)).half()
        except DecodeError:  # gone or changed since it was first read: the clean image stands in
            return None

    def get(self, paths: list[Path], augment: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
        """(B', 3, S, S) the images that load, and their positions in `paths`; with `augment`, that share
        of them (drawn with `seed`) is one of the image's degraded copies instead."""
        missing = [p for p in dict.fromkeys(paths) if p not in self.cache]
        loaded = dict(zip(missing, ordered_map(self._load, missing, self.workers, prefetch=len(missing) or 1)))
        for p, x in loaded.items():
            if len(self.cache) < self.max_items or x is None:  # failures are remembered, never retried
                self.cache[p] = x
        tensors = [self.cache[p] if p in self.cache else loaded[p] for p in paths]
        keep = [i for i, x in enumerate(tensors) if x is not None]
        if augment and self.variants and keep:
            rng = random.Random(seed)
            chosen = {i: (paths[i], rng.randrange(self.variants)) for i in keep if rng.random() < augment}
            new = [k for k in dict.fromkeys(chosen.values()) if k not in self.degraded]
            made = dict(zip(new, ordered_map(self._degrade, new, self.workers, prefetch=len(new) or 1)))
            for key, x in made.items():
                if x is not None and len(self.degraded) < self.max_items:  # past the cap, made again when drawn
                    self.degraded[key] = x
            for i, key in chosen.items():
                x = self.degraded.get(key, made.get(key))
                tensors[i] = tensors[i] if x is None else x
        stacked = torch.stack([tensors[i] for i in keep]).float() if keep else torch.empty(0)
        return stacked, keep


class FrozenFeatures:
    """What frozen encoders make of each training image and text, computed once before the first step
    (`fill`) and kept up to `budget_gb`, so that a reranker's stage runs the encoders over its data once
    instead of at every step; what does not fit is encoded when drawn, as without the cache.

    Filled in one pass, not as batches first draw each item: kept rows made between steps, hundreds of
    thousands of small tensors among each step's large temporaries, left a whole reranker stage's
    process growing to 10 GB and its steps slowing from 0.66 to about 0.9 s.

    Each row of an encoder's output depends on its own input only, and text padding is masked out
    downstream, so a kept row equals the one its batch would have given, up to rounding: matrix kernels
    sum in an order that can change with the batch's shape. A run with the cache therefore follows one
    without it closely, not bit for bit.
    """

    def __init__(self, encoder: DualEncoder, images: ImageCache, cfg, budget_gb: float):
        self.encoder, self.images, self.cfg = encoder, images, cfg
        self.room = int(budget_gb * 2**30)  # bytes left
        self.image: dict[Path, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.text: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.grid: tuple[int, int] | None = None
        self.filling = False

    def fill(self, paths: list[Path], texts: list[str], chunk: int = 256) -> None:
        """Encode and keep these images and texts (until the budget is spent); later calls keep nothing."""
        self.filling = True
        try:
            for s in range(0, len(paths), chunk):
                self.encode_images(paths[s:s + chunk])
            texts = list(dict.fromkeys(texts))
            for s in range(0, len(texts), chunk):
                self.encode_texts(texts[s:s + chunk])
        finally:
            self.filling = False

    def _keep(self, table: dict, key, emb: torch.Tensor, tokens: list[torch.Tensor]) -> tuple:
        size = sum(t.numel() * t.element_size() for t in (emb, *tokens))
        if not self.filling or size > self.room:
            return emb, tokens
        table[key] = row = (emb.clone(), [t.clone() for t in tokens])  # own storage, not a view of the batch's
        self.room -= size
        return row

    def encode_images(self, paths: list[Path]) -> tuple[Encoded | None, list[int]]:
        """The images' features (Encoded as encode_images gives them), for those that load, and their positions."""
        rows = {p: self.image[p] for p in paths if p in self.image}
        missing = [p for p in dict.fromkeys(paths) if p not in rows]
        if missing:
            pixels, keep = self.images.get(missing)
            if keep:
                out = self.encoder.encode_images(pixels, self.cfg.image_layers)
                self.grid = out.grid
                for j, i in enumerate(keep):
                    rows[missing[i]] = self._keep(self.image, missing[i], out.embeddings[j], [t[j] for t in out.tokens])
        keep = [i for i, p in enumerate(paths) if p in rows]
        if not keep:
            return None, keep
        chosen = [rows[paths[i]] for i in keep]
        return Encoded(torch.stack([r[0] for r in chosen]), [torch.stack(level) for level in zip(*(r[1] for r in chosen))],
                       grid=self.grid), keep

    def encode_texts(self, texts: list[str]) -> Encoded:
        """The texts' features, as encode_texts gives them (padding rows zero, and masked)."""
        rows = {t: self.text[t] for t in texts if t in self.text}
        missing = [t for t in dict.fromkeys(texts) if t not in rows]
        if missing:
            out = self.encoder.encode_texts(missing, self.cfg.text_layers)
            for j, (t, n) in enumerate(zip(missing, out.mask.sum(1).tolist())):
                rows[t] = self._keep(self.text, t, out.embeddings[j], [x[j, :n] for x in out.tokens])
        chosen = [rows[t] for t in texts]
        lengths = torch.tensor([len(r[1][0]) for r in chosen])
        tokens = [torch.nn.utils.rnn.pad_sequence(level, batch_first=True) for level in zip(*(r[1] for r in chosen))]
        mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
        return Encoded(torch.stack([r[0] for r in chosen]), tokens, mask=mask)
