"""An image prepared for the image tower without torch: the same pixels as open_clip's eval transform.

open_clip's transform for inference is torchvision's Resize (shorter side to the input size,
bicubic, on the PIL image), CenterCrop, ToTensor and Normalize; or Resize to the square for
`squash`. Each step is PIL or plain float32 arithmetic, done here in the same order, so the
result is the same array bit for bit (tests/indexer/test_preprocess.py holds it to that).

    >>> prep = ImagePrep(size=224, mean=OPENAI_MEAN, std=OPENAI_STD)
    >>> prep(Image.new("RGB", (640, 480))).shape
    (3, 224, 224)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "squash")  # open_clip's "longest" (resize and pad) is not supported here
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class ImagePrep:
    size: int  # side of the square the image tower takes, pixels
    mean: tuple[float, float, float]  # per-channel mean subtracted after scaling to [0, 1]
    std: tuple[float, float, float]  # per-channel divisor after the mean
    interpolation: str = "bicubic"  # "bicubic" or "bilinear"
    resize_mode: str = "shortest"  # "shortest": shorter side to `size`, then centre crop; "squash": to the square

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES or self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unsupported preprocessing {self.resize_mode}/{self.interpolation}")

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> (3, size, size) float32, normalised."""
        image = self._crop(self._resize(image))
        x = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255)  # (S, S, 3)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)

    def _resize(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if self.resize_mode == "squash":
            new_w, new_h = self.size, self.size
        else:  # torchvision's size for a shorter-side resize, truncated the way it truncates
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) == (w, h):
            return image
        return image.resize((new_w, new_h), INTERPOLATIONS[self.interpolation])

    def _crop(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if (w, h) == (self.size, self.size):
            return image
        if w < self.size or h < self.size:
            raise ValueError(f"image of {w}x{h} is smaller than the {self.size}-pixel crop")
        top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))
