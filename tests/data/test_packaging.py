"""What a non-editable install holds: one import name (`itm`), the bundled model and the page as package data, and
console scripts that work from any folder, even one with folders named like the repository's."""
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    had_build = (ROOT / "build").exists()
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(out), str(ROOT)], check=True, capture_output=True)
    finally:
        if not had_build:  # setuptools builds in the checkout: leave it as it was
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    return next(out.glob("itm-*.whl"))


def test_the_wheel_holds_one_top_level_package_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"itm", wheel.name.split("-py")[0] + ".dist-info"}
    for data in ("itm/data/demo/encoder.safetensors", "itm/data/demo/bundle.json", "itm/retrieval/static/index.html",
                 "itm/models/model_configs/itm-demo.json", "itm/models/fusion_configs/fusion-demo.json"):
        assert data in names
    assert "itm/data/scenes/glyphs/LICENSE-NOTO.txt" in names and any(n.startswith("itm/data/scenes/glyphs/1f")
                                                                          for n in names)
    stray = [n for n in names if "/work/" in n or (n.endswith(".png") and "/scenes/glyphs/" not in n)]
    assert not stray, "a recipe's work or the samples were packaged"


def test_an_installed_itm_runs_from_a_folder_with_lookalike_packages(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, system_site_packages=True)  # the dependencies come from this environment
    python = env / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True)
    here = tmp_path / "work"
    for name in ("data", "indexer", "retrieval", "itm"):
        (here / name).mkdir(parents=True)
        (here / name / "__init__.py").write_text("raise ImportError('the wrong package was imported')\n")
    for script in ("itm-index", "itm-search", "itm-serve", "itm-train", "itm-eval", "itm-calibrate"):
        done = subprocess.run([env / "bin" / script, "--help"], cwd=here, capture_output=True, text=True)
        assert done.returncode == 0 and "Usage" in done.stdout, (script, done.stderr[-500:])
    code = "import itm, itm.models.registry as r; print(r.resolve_model('demo').checkpoint)"
    done = subprocess.run([python, "-I", "-c", code], cwd=here, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    assert str(env) in done.stdout  # the demo bundle found as package data of the installed itm
