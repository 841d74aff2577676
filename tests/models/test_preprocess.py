"""Image preparation without torch against open_clip's eval transform: the same array, bit for bit."""
import numpy as np
import open_clip
import pytest
from PIL import Image

from itm.models.preprocess import OPENAI_MEAN, OPENAI_STD, ImagePrep

SIZES = [(0, 0), (640, 480), (480, 640), (0, 1), (3, 0), (1000, 37), (500, 129), (333, 777)]  # added to the side


@pytest.mark.parametrize("side", [32, 64, 224])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_same_pixels_as_open_clip(side, interpolation):
    rng = np.random.default_rng(side)
    theirs = open_clip.image_transform(side, is_train=False, interpolation=interpolation)
    ours = ImagePrep(side, OPENAI_MEAN, OPENAI_STD, interpolation)
    for dw, dh in SIZES:
        w, h = (dw or side) + (side if dw > 100 else 0), (dh or side) + (side if dh > 100 else 0)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = theirs(image).numpy()
        got = ours(image)
        assert got.dtype == np.float32 and got.shape == (3, side, side)
        assert np.array_equal(got, want), (w, h)


def test_squash_and_other_statistics():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)
    theirs = open_clip.image_transform(48, is_train=False, mean=mean, std=std, resize_mode="squash")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 31, 3), dtype=np.uint8))
    assert np.array_equal(ImagePrep(48, mean, std, resize_mode="squash")(image), theirs(image).numpy())
    with pytest.raises(ValueError, match="unsupported preprocessing"):
        ImagePrep(48, mean, std, resize_mode="longest")
