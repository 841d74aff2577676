import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from itm.common.errors import DecodeError
from itm.data.corpora import HUGE_HEADER_SIZE, UNREADABLE, make_odd_files
from itm.models.images import DEFAULT_MAX_PIXELS, HEIF_AVAILABLE, IMAGE_EXTENSIONS, load_image


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("odd")
    return folder, make_odd_files(folder)


def decode(folder: Path, name: str, min_side: int = 1, **kwargs) -> np.ndarray:
    im = load_image((folder / name).read_bytes(), min_side=min_side, **kwargs)
    assert im.mode == "RGB"
    return np.asarray(im)


def reason(data, **kwargs) -> str:
    with pytest.raises(DecodeError) as info:
        load_image(data, min_side=kwargs.pop("min_side", 1), **kwargs)
    return str(info.value)


def gradient_jpeg(size: tuple[int, int], **params) -> bytes:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    pixels[..., 1] = np.linspace(0, 255, size[1], dtype=np.uint8)[:, None]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", **params)
    return buf.getvalue()


# ------------------------------------------------------------------ outcomes and reasons


def test_every_odd_file_has_its_expected_outcome(odd):
    folder, expected = odd
    outcomes = {}
    for name in expected:
        try:
            load_image(folder / name, min_side=1)
            outcomes[name] = "ok"
        except DecodeError:
            outcomes[name] = "skip"
    assert outcomes == expected
    assert expected["empty.jpg"] == "skip" and expected["png_named.jpg"] == "ok"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("empty.jpg", "empty file"),
        ("truncated.jpg", "truncated image data"),
        ("text.png", "not an image (cannot identify format)"),
        (
            "huge_header.png",
            "image is 20000 x 20000, over the pixel cap of 100000000; raise --max-pixels to allow it",
        ),
    ],
)
def test_skip_reasons(odd, name, expected):
    folder, _ = odd
    assert reason((folder / name).read_bytes()) == expected
    assert reason(folder / name) == expected


def test_garbage_after_a_jpeg_marker_is_a_decode_error(odd):
    folder, _ = odd
    assert reason(folder / "garbage.jpg")


def test_truncated_images_are_never_padded_with_grey():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = gradient_jpeg((600, 400), quality=90)
    for cut in (len(data) // 4, len(data) // 2, len(data) - 50):
        assert reason(data[:cut], min_side=224) == "truncated image data"


def test_path_failures_have_short_reasons(tmp_path, monkeypatch):
    assert reason(tmp_path / "missing.jpg") == "file not found"
    (tmp_path / "folder.jpg").mkdir()
    assert reason(tmp_path / "folder.jpg") == "is a directory, not a file"

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert reason(tmp_path / "locked.jpg") == "permission denied"


def test_unreadable_fixture_outcome_matches_this_process(odd):
    folder, expected = odd
    try:
        (folder / UNREADABLE).read_bytes()
        readable = True
    except PermissionError:
        readable = False
    assert expected[UNREADABLE] == ("ok" if readable else "skip")


def test_min_side_must_be_positive(odd):
    folder, _ = odd
    with pytest.raises(ValueError):
        load_image(folder / "plain.jpg", min_side=0)


@pytest.mark.skipif(HEIF_AVAILABLE, reason="pillow-heif is installed")
def test_heif_without_the_optional_package_says_what_to_install():
    assert ".heic" not in IMAGE_EXTENSIONS
    fake_heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    assert "pip install 'itm[heic]'" in reason(fake_heic)


def test_extensions_are_lower_case_suffixes():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tiff", ".tif"} <= IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)


# ------------------------------------------------------------------------ conversions


def test_palette_transparency_is_white(odd):
    pixels = decode(odd[0], "palette_transparent.png")
    assert pixels.shape == (8, 8, 3)
    assert (pixels[:, :4] == 255).all()
    assert (pixels[:, 4:] == (255, 0, 0)).all()


def test_rgba_transparent_black_is_white_not_black(odd):
    pixels = decode(odd[0], "rgba.png")
    assert (pixels[:, :4] == 255).all()
    assert (pixels[:, 4:] == (0, 0, 255)).all()


def test_grey_with_alpha(odd):
    pixels = decode(odd[0], "la.png")
    assert (pixels[:, :4] == 255).all()
    assert (pixels[:, 4:] == 100).all()


def test_half_transparent_pixel_blends_with_white():
    buf = io.BytesIO()
    Image.new("RGBA", (2, 2), (0, 0, 0, 128)).save(buf, "PNG")
    pixels = np.asarray(load_image(buf.getvalue(), min_side=1))
    assert np.abs(pixels.astype(int) - 127).max() <= 1


def test_cmyk_jpeg(odd):
    pixels = decode(odd[0], "cmyk.jpg", min_side=16).astype(int)
    assert pixels.shape == (16, 16, 3)
    assert np.abs(pixels - (255, 0, 0)).max() <= 8


def test_sixteen_bit_grey_is_scaled_not_clipped(odd):
    pixels = decode(odd[0], "grey16.png")
    assert pixels.shape == (1, 4, 3)
    assert pixels[0, :, 0].tolist() == [0, 128, 255, 1]  # 0, 32768, 65535, 256
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_one_bit_image(odd):
    pixels = decode(odd[0], "bilevel.bmp")
    assert (pixels[:, :4] == 0).all()
    assert (pixels[:, 4:] == 255).all()


def test_exif_orientation_is_applied(odd):
    pixels = decode(odd[0], "exif_rotated.jpg", min_side=20).astype(int)
    assert pixels.shape == (40, 20, 3)  # stored 40 wide, 20 high
    assert np.abs(pixels[5, 10] - (255, 0, 0)).max() <= 10  # stored left half is now on top
    assert np.abs(pixels[35, 10] - (0, 0, 255)).max() <= 10


@pytest.mark.parametrize("name", ["animated.gif", "animated.webp"])
def test_animated_images_give_the_first_frame(odd, name):
    pixels = decode(odd[0], name)
    assert pixels.shape == (16, 16, 3)
    assert (pixels == (255, 0, 0)).all()


def test_mislabelled_png_decodes(odd):
    pixels = decode(odd[0], "png_named.jpg")
    assert pixels.shape == (6, 10, 3)
    assert (pixels == (0, 255, 0)).all()


def test_bytes_and_path_agree(odd):
    folder, _ = odd
    from_path = np.asarray(load_image(folder / "exif_rotated.jpg", min_side=20))
    assert (from_path == decode(folder, "exif_rotated.jpg", min_side=20)).all()


# ------------------------------------------------------------- reduced-size decoding


@pytest.fixture(scope="module")
def photo() -> bytes:
    return gradient_jpeg((4000, 3000), quality=85)


def test_large_jpeg_is_decoded_at_reduced_size(photo):
    im = load_image(photo, min_side=224)
    assert im.size == (500, 375)  # 1/8 DCT scaling; shorter side still >= 224
    assert im.mode == "RGB"
    assert load_image(photo, min_side=1000).size == (2000, 1500)  # 1/2 keeps 1500 >= 1000
    assert load_image(photo, min_side=5000).size == (4000, 3000)  # never upscaled


def test_reduced_size_decoding_is_faster_than_full(photo):
    def best_of_three(min_side: int) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            load_image(photo, min_side=min_side)
            times.append(time.perf_counter() - start)
        return min(times)

    assert best_of_three(224) < 0.5 * best_of_three(5000)


def test_reduced_size_then_exif_orientation():
    im = Image.new("RGB", (2000, 1000), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue(), min_side=224).size == (250, 500)  # 1/4, then transposed


# ------------------------------------------------------------------------- pixel cap


def test_pixel_cap_is_checked_from_the_header(odd):
    folder, _ = odd
    data = (folder / "plain.jpg").read_bytes()  # 64 x 48 = 3072 pixels
    assert reason(data, max_pixels=3071) == (
        "image is 64 x 48, over the pixel cap of 3071; raise --max-pixels to allow it"
    )
    assert load_image(data, min_side=48, max_pixels=3072).size == (64, 48)


def test_raising_the_cap_lets_the_decoder_see_the_file(odd):
    folder, _ = odd
    width, height = HUGE_HEADER_SIZE
    assert width * height > DEFAULT_MAX_PIXELS
    # Above the cap the forged file reaches the decoder, which finds almost no data.
    assert "pixel cap" not in reason(folder / "huge_header.png", max_pixels=width * height)


def test_pillow_global_bomb_check_is_replaced():
    assert Image.MAX_IMAGE_PIXELS is None
