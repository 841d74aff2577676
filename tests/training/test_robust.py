import json

import pytest
import torch
from safetensors.torch import load_file

from itm.common.errors import ItmError
from itm.models.encoder import DualEncoder
from itm.models.registry import resolve_model
from itm.training.data import load_dataset
from itm.training.robust import HardenOptions, harden_images


@pytest.fixture
def data(caption_file):
    return load_dataset(caption_file)


def test_hardening_moves_the_image_tower_alone_toward_the_clean_features(tmp_path, data, tiny_spec):
    opts = HardenOptions(layers=(-2, -1), steps=24, batch_size=6, lr=2e-3, warmup_steps=2, eval_every=8, workers=0)
    r = harden_images(tiny_spec, data, tmp_path / "run", opts, val_data=data)
    assert [v["step"] for v in r.validation] == [0, 8, 16, 24]
    start = r.validation[0]
    assert start["clean"] == pytest.approx(0.0, abs=1e-6) and start["degraded"] > 0  # the student starts as the teacher
    assert min(v["degraded"] for v in r.validation[1:]) < start["degraded"]
    assert r.best_step == min(r.validation, key=lambda v: v["error"])["step"] and r.best_step > 0
    assert r.encoder == tmp_path / "run" / "best" / "encoder.safetensors"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"tokens", "embedding", "total"} <= set(next(x for x in log if "loss" in x)["loss"])
    assert sum("val" in x for x in log) == 4

    # the saved encoder loads; its image tower moved, its text tower is the original's to the bit
    tuned = load_file(str(r.encoder))
    torch.manual_seed(0)  # harden_images drew the random weights of tiny_spec after seeding with opts.seed
    original = DualEncoder.load(tiny_spec).model.state_dict()
    text = [k for k in tuned if not k.startswith("visual.")]
    assert text and all(torch.equal(tuned[k], original[k]) for k in text)
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned if k.startswith("visual."))
    enc = DualEncoder.load(resolve_model("itm-tiny", checkpoint=r.encoder))
    assert enc.encode_texts(["picture 1"]).embeddings.shape == (1, 32)


def test_bad_hardening_requests(tmp_path, data, tiny_spec):
    with pytest.raises(ItmError, match="empty"):
        harden_images(tiny_spec, [], tmp_path / "x", HardenOptions(eval_every=0))
    with pytest.raises(ItmError, match="validation"):
        harden_images(tiny_spec, data, tmp_path / "x", HardenOptions(eval_every=5))
    with pytest.raises(ItmError, match="layers"):
        harden_images(tiny_spec, data, tmp_path / "x", HardenOptions(layers=(-9,), eval_every=0, workers=0))
