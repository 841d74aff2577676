"""What a wheel built from this checkout holds: the code and the bundled model, not the demo recipe's work."""
from pathlib import Path

import pytest
from setuptools import find_namespace_packages

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[2]


def test_recipe_work_folder_is_not_packaged(tmp_path):
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for folder in ("retrieval", "indexer", "data/demo", "data/demo/work/reranker/best", "data/demo/work/synth"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "x.json").write_text("{}")
    found = set(find_namespace_packages(str(tmp_path), include=find["include"], exclude=find.get("exclude", ())))
    assert {"retrieval", "indexer", "data.demo"} <= found
    assert not any(p.startswith("data.demo.work") for p in found), sorted(found)
