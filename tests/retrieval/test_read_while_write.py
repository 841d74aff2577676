"""Searching while builds commit new generations (and compact): no reader errs, loses a file or sees half a commit."""
import pytest
import torch

from benchmarks.read_while_write import read_while_writing
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.models.fusion_checkpoint import save_reranker
from itm.models.registry import resolve_model


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    torch.manual_seed(0)
    model = FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval()
    return resolve_model("itm-tiny", "random", reranker=save_reranker(model, tmp_path_factory.mktemp("rr") / "r.safetensors"))


def test_readers_never_fail_while_generations_are_committed(tmp_path, spec):
    figures = read_while_writing(tmp_path, spec, changes=4)
    assert figures.errors == []
    assert figures.generations >= 8 and figures.compactions >= 1 and figures.queries > 0 and figures.snapshots >= 3
