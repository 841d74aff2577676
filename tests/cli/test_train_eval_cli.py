import json

import numpy as np
from PIL import Image

from tests.cli.test_cli import run


def test_train_then_eval(tmp_path):
    rng = np.random.default_rng(0)
    images = []
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        images.append({"filepath": "imgs", "filename": f"{i}.png", "split": "train" if i < 4 else "test",
                       "sentences": [{"raw": f"picture number {i}"}, {"raw": f"image {i}"}]})
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": images}))

    r = run("itm-train", tmp_path / "karpathy.json", "--out", tmp_path / "run", "--model", "itm-tiny",
            "--pretrained", "random", "--fusion", "fusion-tiny", "--batch-size", "4", "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    assert "2 steps" in r.stdout and "reranker.safetensors" in r.stdout

    r = run("itm-eval", tmp_path / "karpathy.json", "--model", "itm-tiny", "--pretrained", "random",
            "--reranker", tmp_path / "run" / "reranker.safetensors", "--rerank-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["images"] == 2 and out["captions"] == 4
    assert set(out["results"]) == {"recall", "two-stage k=2"}
    for res in out["results"].values():
        assert all(0 <= res[k] <= 100 for k in res if k != "rsum")
        assert res["t2i_r5"] == 100.0  # 2 images: the true one is always within 5

    r = run("itm-eval", tmp_path / "missing.json", "--model", "itm-tiny", "--pretrained", "random")
    assert r.returncode == 1 and "not found" in r.stderr
