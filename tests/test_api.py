"""The Python API at the top of the package: its doctests run on the bundled samples, and importing it (or any
room's face) loads neither torch, faiss nor onnxruntime."""
import doctest
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import itm.api

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples" / "images"


def test_the_api_doctests_run(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(SAMPLES.glob("*.png"))[:12]:
        shutil.copy(p, photos / p.name)
    result = doctest.testmod(itm.api, globs={**vars(itm.api), "SAMPLES": photos}, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6 and result.failed == 0


def test_the_api_refuses_a_bad_query_in_one_line(tmp_path):
    from itm.common.errors import ItmError

    with pytest.raises(ItmError, match="does not exist"):
        itm.api.build(tmp_path / "nothing-here", index=tmp_path / "idx", model="demo")


@pytest.mark.parametrize("module", ["itm", "itm.api", "itm.common.paths", "itm.models", "itm.indexer", "itm.retrieval", "itm.training",
                                    "itm.retrieval.client", "itm.retrieval.query"])
def test_importing_the_package_loads_no_heavy_library(module):
    heavy = ("torch", "faiss", "onnxruntime", "open_clip")
    code = f"import sys, {module}; print(*[m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.split() == [], f"importing {module} loaded {done.stdout.strip()}"
