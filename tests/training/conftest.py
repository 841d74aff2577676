import pytest

from tests.conftest import write_images


@pytest.fixture
def caption_file(tmp_path):
    """12 random images with two captions each, as a .jsonl of (image, caption)."""
    paths = write_images(tmp_path / "imgs", 12, size=(32, 32))
    lines = [f'{{"image": "{p.relative_to(tmp_path)}", "caption": "picture {i} with {c}"}}'
             for i, p in enumerate(paths) for c in ("red", "blue")]
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "caps.jsonl"
