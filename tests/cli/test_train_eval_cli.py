"""itm-train and itm-eval as a user runs them; itm-eval's figures against a one-item-at-a-time oracle."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from itm.models.encoder import DualEncoder
from itm.models.fusion_checkpoint import load_reranker
from itm.models.registry import resolve_model
from tests.cli.test_cli import run
from tests.conftest import write_images

RERANK_K = 3


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
    """16 images with 2 captions each: 6 to train on, 10 to evaluate (enough that R@1 and R@5 are not 100)."""
    root = tmp_path_factory.mktemp("data")
    paths = sorted(write_images(root / "imgs", 16, seed=11, size=(32, 32)))
    images = [{"filepath": str(p.parent.relative_to(root)), "filename": p.name, "split": "train" if i < 6 else "test",
               "sentences": [{"raw": f"picture number {i}"}, {"raw": f"a photo of thing {i}"}]}
              for i, p in enumerate(paths)]
    (root / "karpathy.json").write_text(json.dumps({"images": images}))
    return root


def brute_force_recall(encoder, reranker, items):
    """Recall@1/5/10 both ways by the standard protocol, every image, caption and pair scored on its own."""
    ilayers, tlayers = reranker.cfg.image_layers, reranker.cfg.text_layers
    with torch.no_grad():
        images, captions = [], []
        for item in items:
            out = encoder.encode_images(encoder.load_pixels(item[0])[None], ilayers)
            images.append((out.embeddings[0], reranker.encode_image_store(out.tokens, out.grid).half()))
        for owner, item in enumerate(items):
            for caption in item[1]:
                out = encoder.encode_texts([caption], tlayers)
                feats, mask = reranker.encode_text_store(out.tokens, out.mask)
                captions.append((out.embeddings[0], feats.half(), mask, owner))

        def order(sims, pair):
            ranked = sorted(range(len(sims)), key=lambda j: -sims[j])
            fused = {j: float(reranker.score(reranker(*pair(j)), torch.tensor([sims[j]]))) for j in ranked[:RERANK_K]}
            return sorted(ranked[:RERANK_K], key=lambda j: -fused[j]) + ranked[RERANK_K:]

        t2i, i2t = [], []
        for emb, feats, mask, owner in captions:
            sims = [float(emb @ im[0]) for im in images]
            t2i.append(order(sims, lambda j: (images[j][1], feats, mask)).index(owner))
        for i, (emb, store) in enumerate(images):
            sims = [float(c[0] @ emb) for c in captions]
            ranked = order(sims, lambda j: (store, captions[j][1], captions[j][2]))
            i2t.append(min(ranked.index(j) for j, c in enumerate(captions) if c[3] == i))
    out = {f"t2i_r{k}": 100 * float(np.mean(np.array(t2i) < k)) for k in (1, 5, 10)}
    out |= {f"i2t_r{k}": 100 * float(np.mean(np.array(i2t) < k)) for k in (1, 5, 10)}
    return out


def test_train_then_eval_gives_the_oracle_figures(karpathy, tmp_path):
    r = run("itm-train", karpathy / "karpathy.json", "--out", tmp_path / "run", "--model", "itm-tiny",
            "--pretrained", "random", "--fusion", "fusion-tiny", "--batch-size", "4", "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    assert "2 steps" in r.stdout and "reranker.safetensors" in r.stdout
    reranker_path = tmp_path / "run" / "reranker.safetensors"
    card = json.loads((tmp_path / "run" / "reranker.card.json").read_text())  # what it was trained for
    assert card["encoder"]["arch"] == "itm-tiny" and card["encoder"]["pretrained"] == "random"
    assert card["data"]["name"] == "karpathy.json (train)" and card["steps"] == 2 and card["fusion"] == "fusion-tiny"
    assert set(card["losses"]) >= {"total"}

    r = run("itm-eval", karpathy / "karpathy.json", "--model", "itm-tiny", "--pretrained", "random",
            "--reranker", reranker_path, "--rerank-k", str(RERANK_K), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["images"] == 10 and out["captions"] == 20
    assert set(out["results"]) == {"recall", f"two-stage k={RERANK_K}"}
    figures = out["results"][f"two-stage k={RERANK_K}"]

    encoder = DualEncoder.load(resolve_model("itm-tiny", "random"))
    data = json.loads((karpathy / "karpathy.json").read_text())["images"]
    items = [(karpathy / d["filepath"] / d["filename"], [s["raw"] for s in d["sentences"]])
             for d in data if d["split"] == "test"]
    oracle = brute_force_recall(encoder, load_reranker(reranker_path), items)
    assert {k: figures[k] for k in oracle} == pytest.approx(oracle)
    assert oracle["t2i_r1"] < 100 and oracle["t2i_r5"] < 100  # figures that could have come out otherwise

    # a fine-tune of those weights, its batches holding each image's nearest images, in bf16, fused AdamW
    r = run("itm-train", karpathy / "karpathy.json", "--out", tmp_path / "tuned", "--model", "itm-tiny",
            "--pretrained", "random", "--init-reranker", reranker_path, "--neighbours", "2", "--augment", "0.5",
            "--precision", "bf16", "--fused-optimizer", "--batch-size", "4", "--max-steps", "1", "--lr", "0")
    assert r.returncode == 0, r.stderr
    before, after = load_file(str(reranker_path)), load_file(str(tmp_path / "tuned" / "reranker.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_more_negatives_on_data_without_them_is_refused(karpathy, tmp_path):
    r = run("itm-train", karpathy / "karpathy.json", "--out", tmp_path / "m", "--model", "itm-tiny",
            "--pretrained", "random", "--fusion", "fusion-tiny", "--more-negatives", "1", "--max-steps", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "names none" in r.stderr, r.stderr
    assert not (tmp_path / "m" / "reranker.safetensors").exists()


def test_region_words_need_encoder_training_and_grounded_phrases(karpathy, tmp_path):
    base = ("itm-train", karpathy / "karpathy.json", "--model", "itm-tiny", "--pretrained", "random",
            "--fusion", "fusion-tiny", "--region-words", "1", "--max-steps", "1")
    r = run(*base, "--out", tmp_path / "a")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "needs the encoders to train" in r.stderr, r.stderr
    r = run(*base, "--out", tmp_path / "b", "--train-encoders")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "grounds none" in r.stderr, r.stderr
    assert not list(tmp_path.glob("*/*.safetensors"))


def test_bad_dataset_lines_are_skipped_with_a_reason(karpathy, tmp_path):
    data = karpathy / "captions.jsonl"
    data.write_text('{"image": "imgs/img001.png", "caption": "a red circle"}\n{"image": "imgs/img002.png", \n'
                    '{"image": "imgs/img002.png", "caption": "a blue square"}\n')
    r = run("itm-eval", data, "--model", "itm-tiny", "--pretrained", "random", "--split", "", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"itm-eval: skipping {data}: line 2: invalid JSON" in r.stderr
    assert json.loads(r.stdout)["captions"] == 2

    r = run("itm-eval", tmp_path / "missing.json", "--model", "itm-tiny", "--pretrained", "random")
    assert r.returncode == 1 and "not found" in r.stderr
