"""Fixtures shared by all tests: tiny registered models, generated corpora, isolated user dirs."""
from __future__ import annotations

from pathlib import Path

import pytest

from itm.data.corpora import write_images  # noqa: F401  (tests import it from here too)
from itm.models.registry import resolve_model

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


@pytest.fixture(scope="session")
def export_cache_dir(tmp_path_factory) -> Path:
    """One cache of exported graphs for the whole run: each tiny model is exported once, not once per test."""
    return tmp_path_factory.mktemp("itm-cache")


@pytest.fixture(autouse=True)
def isolated_user_dirs(tmp_path_factory, monkeypatch, export_cache_dir):
    """No test reads or writes the real per-user index, caches or hub."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("ITM_CACHE_DIR", str(export_cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ITM_INDEX", raising=False)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run faster on one thread than on two shared ones: OpenMP's waiting costs more than it gains."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_spec():
    return resolve_model("itm-tiny", "random")


@pytest.fixture(scope="session")
def tiny_rerank_spec(tmp_path_factory):
    """itm-tiny with a fusion-tiny reranker of fixed random weights."""
    import torch

    from itm.models.fusion import FusionReranker, get_fusion_config
    from itm.models.fusion_checkpoint import save_reranker

    torch.manual_seed(0)
    model = FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval()
    path = save_reranker(model, tmp_path_factory.mktemp("rr") / "reranker.safetensors")
    return resolve_model("itm-tiny", "random", reranker=path)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_spec):
    from itm.models.encoder import DualEncoder
    return DualEncoder.load(tiny_spec)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    write_images(folder, 12)
    return folder


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(f"a {c} square number {i}" for i, c in enumerate(COLOURS)) + "\n")
    return path


@pytest.fixture(autouse=True)
def isolated_runtime_dir(tmp_path_factory, monkeypatch):
    """No test finds a server the user runs, or announces one where the user's commands would find it."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("run")))
