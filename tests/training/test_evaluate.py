import json

import numpy as np
import pytest
import torch
from PIL import Image

from itm.training.data import load_dataset
from itm.training.evaluate import Features, embed_dataset, rank, recall


def unit(*v):
    v = torch.tensor(v, dtype=torch.float32)
    return v / v.norm()


@pytest.fixture
def hand_features():
    """3 images (the axes) x 2 captions each, with rankings worked out by hand below."""
    images = torch.eye(3)
    captions = torch.stack([
        unit(1, 0.05, 0.02),  # image 0: img0, img1, img2              -> t2i rank 0
        unit(0.2, 1, 0.1),    # image 0: img1, img0, img2              -> rank 1
        unit(0.1, 0.5, 1),    # image 1: img2, img1, img0              -> rank 1
        unit(0.1, 1, 0),      # image 1: img1 first                    -> rank 0
        unit(1, 0.3, 0.2),    # image 2: img0, img1, img2              -> rank 2
        unit(1, 0.1, 0.2),    # image 2: img0, img2, img1              -> rank 1
    ])
    return Features(images, captions, np.array([0, 0, 1, 1, 2, 2]), [f"c{i}" for i in range(6)])


def test_recall_matches_a_hand_computation(hand_features):
    r = rank(hand_features)
    assert r.t2i.tolist() == [0, 1, 1, 0, 2, 1]
    # image -> text, by hand (cosines to each image axis):
    # image 0: c0 0.999, c5 0.976, c4 0.941, ...      -> its own c0 first: rank 0
    # image 1: c3 0.995, c1 0.976, c2 0.445, ...      -> its own c3 first: rank 0
    # image 2: c2 0.891, c5 0.195, c4 0.188, c1 0.098 -> c2 is image 1's; its own c5 second: rank 1
    assert r.i2t.tolist() == [0, 0, 1]
    out = recall(r, ks=(1, 2))
    assert out["t2i_r1"] == pytest.approx(100 * 2 / 6) and out["t2i_r2"] == pytest.approx(100 * 5 / 6)
    assert out["i2t_r1"] == pytest.approx(100 * 2 / 3)
    assert out["rsum"] == pytest.approx(sum(v for k, v in out.items() if k != "rsum"))
    sub = recall(r, ks=(1,), images=np.array([False, False, True]), caption_image=hand_features.caption_image)
    assert sub["t2i_r1"] == 0.0


def test_reranking_reorders_only_the_top_k(hand_features):
    class PreferImage2:  # a stand-in reranker whose logit favours image 2 for every caption
        cfg = None

        def __call__(self, img, txt, mask):
            return (img[:, 0, 0, 0] == 2).float() * 10

        def score(self, logit, sim, weight=None):  # FusionReranker.score, weight 1
            return sim + logit

    f = hand_features
    f.image_store = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1)
    f.text_store, f.text_mask = torch.zeros(6, 1, 1, 1), torch.ones(6, 1, dtype=torch.bool)
    r2 = rank(f, PreferImage2(), rerank_k=2)
    # only captions whose top 2 hold image 2 change: caption 2's image 1 stays second (image 2 was
    # already first); caption 4 had image 2 at recall rank 2, outside k=2, so it stays at rank 2;
    # caption 5 had it at rank 1, inside, so the reranker lifts it to rank 0
    assert r2.t2i.tolist() == [0, 1, 1, 0, 2, 0]
    r3 = rank(f, PreferImage2(), rerank_k=3)
    assert r3.t2i[4] == 0


def test_embed_dataset_equals_encoding_one_item_at_a_time(tmp_path, tiny_encoder):
    rng = np.random.default_rng(0)
    images = []
    for i in range(5):
        name = f"{i}.png"
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name)
        images.append({"filepath": "imgs", "filename": name, "split": "test" if i < 4 else "train",
                       "sentences": [{"raw": f"caption {i} a"}, {"raw": f"a longer caption for image {i} b"}]})
    (tmp_path / "k.json").write_text(json.dumps({"images": images}))
    data = load_dataset(tmp_path / "k.json", split="test")
    assert [d.image.name for d in data] == ["0.png", "1.png", "2.png", "3.png"]
    f = embed_dataset(tiny_encoder, None, data, batch_size=3, workers=2)  # batches of 3, decoded in 2 threads
    one = [tiny_encoder.encode_images(tiny_encoder.load_pixels(d.image)[None]).embeddings[0] for d in data]
    torch.testing.assert_close(f.image_emb, torch.stack(one), rtol=0, atol=1e-5)
    texts = [c for d in data for c in d.captions]
    one = [tiny_encoder.encode_texts([t]).embeddings[0] for t in texts]
    assert f.texts == texts and f.caption_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(f.text_emb, torch.stack(one), rtol=0, atol=1e-5)


def test_oracle_recall_equals_enumerating_every_tie_break():
    """Expected R@K of the truth-knowing oracle, against averaging over all orders of the true items."""
    import itertools

    from itm.training.evaluate import oracle_recall

    truth = np.array([[1, 1, 0, 1],    # caption 0 (image 0) is true of images 0, 1, 3
                      [1, 0, 0, 0],    # caption 1 (image 0): only its own
                      [0, 1, 1, 0],    # caption 2 (image 1)
                      [1, 1, 0, 1],    # caption 3 (image 2): same words as caption 0, also true of 2
                      [0, 0, 0, 1]], dtype=bool)
    truth[3, 2] = True
    owner = np.array([0, 0, 1, 2, 3])
    got = oracle_recall(truth, owner, ks=(1, 2))

    def expected_t2i(k):
        hits = []
        for q, row in enumerate(truth):
            true = np.flatnonzero(row)
            orders = list(itertools.permutations(true))
            hits.append(np.mean([owner[q] in o[:k] for o in orders]))
        return 100 * np.mean(hits)

    def expected_i2t(k):
        hits = []
        for i in range(truth.shape[1]):
            true = np.flatnonzero(truth[:, i])
            orders = list(itertools.permutations(true))
            hits.append(np.mean([any(owner[c] == i for c in o[:k]) for o in orders]))
        return 100 * np.mean(hits)

    for k in (1, 2):
        assert got[f"t2i_r{k}"] == pytest.approx(expected_t2i(k))
        assert got[f"i2t_r{k}"] == pytest.approx(expected_i2t(k))


def test_truth_recall_and_pair_wins_against_loops():
    from itm.training.evaluate import Ranks, pair_wins, truth_recall

    rng = np.random.default_rng(0)
    nt, ni = 12, 6
    truth = rng.random((nt, ni)) < 0.3
    t2i_order = np.stack([rng.permutation(ni) for _ in range(nt)])
    i2t_order = np.stack([rng.permutation(nt) for _ in range(ni)])
    r = Ranks(np.zeros(nt, int), np.zeros(ni, int), t2i_order, i2t_order)
    got = truth_recall(r, truth)
    assert got["t2i_truth1"] == pytest.approx(100 * np.mean([truth[q, t2i_order[q, 0]] for q in range(nt)]))
    assert got["t2i_truth5"] == pytest.approx(
        100 * np.mean([any(truth[q, i] for i in t2i_order[q, :5]) for q in range(nt)]))
    assert got["i2t_truth1"] == pytest.approx(100 * np.mean([truth[i2t_order[i, 0], i] for i in range(ni)]))
    sub = truth_recall(r, truth, queries=np.arange(nt) < 4, images=np.arange(ni) >= 3)
    assert sub["t2i_truth1"] == pytest.approx(100 * np.mean([truth[q, t2i_order[q, 0]] for q in range(4)]))
    assert sub["i2t_truth1"] == pytest.approx(100 * np.mean([truth[i2t_order[i, 0], i] for i in range(3, ni)]))

    queries = np.array([0, 3, 5, 7])
    right, wrong = rng.integers(0, ni, 4), rng.integers(0, ni, 4)
    wins = pair_wins(t2i_order, queries, right, wrong)
    loop = [list(t2i_order[q]).index(a) < list(t2i_order[q]).index(b) for q, a, b in zip(queries, right, wrong)]
    assert wins.tolist() == loop


def test_swap_accuracy_equals_scoring_each_pair_alone(tmp_path, tiny_encoder):
    """Batched swap accuracy against the fused score of (image, caption) and (image, negative) one at a time."""
    from itm.models.fusion import FusionReranker, get_fusion_config
    from itm.training.evaluate import swap_accuracy
    from tests.conftest import write_images

    paths = write_images(tmp_path, 3, size=(32, 32))
    rows = [{"image": str(p.relative_to(tmp_path)), "caption": c} for p in paths for c in ("a red cat", "a blue dog on a mat")]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_dataset(tmp_path / "d.jsonl")
    torch.manual_seed(0)
    reranker = FusionReranker(get_fusion_config("fusion-tiny", image_width=tiny_encoder.image_width,
                                                text_width=tiny_encoder.text_width)).eval()
    feats = embed_dataset(tiny_encoder, reranker, data)
    negatives = ["a blue cat", None, "a red dog on a mat", "a green cat", None, "a dog on a red mat"]
    dual, fused = swap_accuracy(tiny_encoder, reranker, feats, negatives)
    assert len(dual) == len(fused) == 4

    def fused_score(image: int, text: str) -> tuple[float, float]:
        img = tiny_encoder.encode_images(feats_pixels[image][None], reranker.cfg.image_layers)
        txt = tiny_encoder.encode_texts([text], reranker.cfg.text_layers)
        with torch.no_grad():
            istore = reranker.encode_image_store(img.tokens, img.grid).half()
            tstore, mask = reranker.encode_text_store(txt.tokens, txt.mask)
            sim = (img.embeddings * txt.embeddings).sum()
            return float(sim), float(reranker.score(reranker(istore, tstore.half(), mask), sim))

    feats_pixels = [tiny_encoder.load_pixels(d.image) for d in data]
    k = 0
    for t, neg in enumerate(negatives):
        if neg is None:
            continue
        image = feats.caption_image[t]
        (pos_sim, pos), (neg_sim, negf) = fused_score(image, feats.texts[t]), fused_score(image, neg)
        assert dual[k] == (pos_sim > neg_sim) and fused[k] == (pos > negf)
        k += 1
