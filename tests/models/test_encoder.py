import time
import warnings
from types import SimpleNamespace

import pytest
import torch

import itm.models.encoder
from itm.common.errors import CheckpointError, ItmError, ItmWarning, UnknownModelError, WeightsUnavailableError
from itm.models.encoder import DualEncoder
from itm.models.registry import list_models, resolve_model


def test_embeddings_are_unit_and_tokens_have_the_promised_shapes(tiny_encoder):
    pixels = torch.randn(3, 3, 32, 32)
    plain = tiny_encoder.encode_images(pixels)
    out = tiny_encoder.encode_images(pixels, layers=[-2, -1])
    assert torch.allclose(plain.embeddings, out.embeddings, atol=1e-6)
    assert torch.allclose(out.embeddings.norm(dim=-1), torch.ones(3))
    assert out.grid == (4, 4) and [t.shape for t in out.tokens] == [(3, 17, 64)] * 2
    txt = tiny_encoder.encode_texts(["a red circle", "a blue square left of a green star"], layers=[0])
    assert txt.mask.sum(1).tolist() == [5, 10]  # SOT + words + EOT
    assert txt.tokens[0].shape == (2, 10, 64)  # padding past the longest text is cut: causal tower, EOT pooling


def test_cutting_padding_does_not_change_text_features(tiny_encoder):
    texts = ["a red circle", "a blue square left of a green star"]
    ids = tiny_encoder.tokenizer(texts)  # (2, 16): full context, padded
    with torch.no_grad():
        full = tiny_encoder.model.encode_text(ids, normalize=True)
    assert torch.allclose(tiny_encoder.encode_texts(texts).embeddings, full, atol=1e-6)


def test_random_weights_are_reproducible_and_checkpoint_round_trip_is_exact(tmp_path, tiny_spec, tiny_encoder):
    pixels = torch.randn(2, 3, 32, 32)
    again = DualEncoder.load(tiny_spec)
    assert torch.equal(again.encode_images(pixels).embeddings, tiny_encoder.encode_images(pixels).embeddings)
    path = tiny_encoder.save(tmp_path / "enc.safetensors")
    loaded = DualEncoder.load(resolve_model("itm-tiny", checkpoint=path))
    assert torch.equal(loaded.encode_images(pixels).embeddings, tiny_encoder.encode_images(pixels).embeddings)
    assert torch.equal(loaded.encode_texts(["x y"]).embeddings, tiny_encoder.encode_texts(["x y"]).embeddings)
    assert loaded.identity.checkpoint_sha256 and tiny_encoder.identity.checkpoint_sha256 is None


def test_pickle_and_broken_checkpoints_are_refused(tmp_path):
    pt = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    with pytest.raises(CheckpointError):
        DualEncoder.load(resolve_model("itm-tiny", checkpoint=tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense")
    bad.with_suffix(".json").write_text('{"kind": "dual_encoder", "arch": "itm-tiny", "model_cfg": {}}')
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        DualEncoder.load(resolve_model("itm-tiny", checkpoint=bad))


def test_bf16_is_close_to_fp32(tiny_spec, tiny_encoder):
    pixels = torch.randn(4, 3, 32, 32)
    bf16 = DualEncoder.load(tiny_spec, precision="bf16")
    cos = (bf16.encode_images(pixels).embeddings * tiny_encoder.encode_images(pixels).embeddings).sum(-1)
    assert cos.min() > 0.98
    with pytest.raises(ItmError, match="fp16 needs a GPU"):
        DualEncoder.load(tiny_spec, precision="fp16")


def test_bf16_on_a_cpu_without_native_bf16_warns_and_names_fp32(tiny_spec, monkeypatch):
    monkeypatch.setattr(itm.models.encoder, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(ItmWarning, match="slower than fp32.*--precision fp32"):
        DualEncoder.load(tiny_spec, precision="bf16")
    monkeypatch.setattr(itm.models.encoder, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DualEncoder.load(tiny_spec, precision="bf16")
        DualEncoder.load(tiny_spec, precision="fp32")


def test_missing_weights_fail_fast_with_the_remedy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="--checkpoint PATH.*--model demo"):
        DualEncoder.load(resolve_model())  # ViT-B-32 / laion2b_s34b_b79k
    assert time.perf_counter() - t0 < 30


def test_unknown_names_are_clear_errors():
    with pytest.raises(UnknownModelError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")
    with pytest.raises(UnknownModelError, match="no pretrained weights tagged"):
        DualEncoder.load(resolve_model("ViT-B-32", "no-such-tag"))
    assert "demo" in list_models() and "itm-tiny" in list_models()
    # a bundle brings its own encoder: other weights for it are refused, not silently replaced by the bundle's
    with pytest.raises(UnknownModelError, match="'demo' is a bundle .* --model itm-demo --checkpoint PATH"):
        resolve_model("demo", checkpoint="other/encoder.safetensors")
    assert resolve_model("itm-demo", checkpoint="other/encoder.safetensors").checkpoint.name == "encoder.safetensors"


class WordTokenizer:
    """A word-level tokenizer shaped like open_clip's Hugging Face wrappers (HFTokenizer, SigLipTokenizer): a
    callable giving (B, context) ids, its special ids on `.tokenizer`. Word ids start at 10, so its end-of-text
    id is far from the largest, unlike SimpleTokenizer's."""

    WORDS = "a red blue green circle square star left of".split()

    def __init__(self, layout: str, context_length: int = 16):
        self.layout, self.context_length = layout, context_length
        self.vocab = {w: 10 + i for i, w in enumerate(self.WORDS)}
        special = {  # (bos, eos, sep, pad, cls) as the transformers tokenizer inside each wrapper has them
            "bert": (None, None, 2, 0, 1),  # [CLS] words [SEP] pad...; BERT vocabularies have no eos
            "t5": (None, 1, None, 1, None),  # words </s> then padding with the same id (SigLIP's T5 vocabulary)
            "clips": (0, 2, None, 1, 3),  # <s> words </s> pad... and a class token in the last position
        }[layout]
        names = ("bos_token_id", "eos_token_id", "sep_token_id", "pad_token_id", "cls_token_id")
        self.tokenizer = SimpleNamespace(**dict(zip(names, special)))

    def real(self, text: str) -> list[int]:
        """The ids up to and including end-of-text."""
        t, words = self.tokenizer, [self.vocab[w] for w in text.split()]
        if self.layout == "bert":
            return [t.cls_token_id, *words, t.sep_token_id]
        if self.layout == "t5":
            return [*words, t.eos_token_id]
        return [t.bos_token_id, *words, t.eos_token_id]

    def __call__(self, texts, context_length=None):
        n = context_length or self.context_length
        out = torch.full((len(texts), n), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.real(text)
            out[row, :len(ids)] = torch.tensor(ids)
        if self.layout == "clips":
            out[:, -1] = self.tokenizer.cls_token_id
        return out


@pytest.mark.parametrize("layout", ["bert", "t5", "clips"])
def test_end_of_text_is_found_when_its_id_is_not_the_largest(tiny_encoder, layout):
    tok = WordTokenizer(layout)
    enc = DualEncoder(tiny_encoder.model, tok, tiny_encoder.preprocess, tiny_encoder.spec, tiny_encoder.identity)
    texts = ["a red circle", "a blue square left of a green star", "star"]
    out = enc.encode_texts(texts, layers=[-1])
    assert out.mask.sum(1).tolist() == [len(tok.real(t)) for t in texts]
    assert all(row[:n].all() and not row[n:].any() for row, n in zip(out.mask, out.mask.sum(1)))  # a prefix

