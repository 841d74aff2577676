"""The two item encoders against each other (exported graphs vs torch), and the export cache."""
import json

import numpy as np
import onnx
import pytest
import torch

from itm.common.errors import ExportError, ItmError
from itm.models import export_cache, onnx_export, onnx_items
from itm.models.fusion import FusionReranker, get_fusion_config
from itm.models.fusion_checkpoint import save_reranker
from itm.models.item_encoder import Runtime
from itm.models.loading import load_item_encoder
from itm.models.onnx_items import OnnxItemEncoder
from itm.models.registry import resolve_model
from itm.models.torch_items import TorchItemEncoder
from tests.conftest import write_images

TEXTS = ["a red circle left of a blue square", "x", "Two DOGS & a cat, naïve café! " * 3, "a green triangle"]


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory):
    torch.manual_seed(0)  # the same reranker as tests/retrieval's: its export is made once per run
    model = FusionReranker(get_fusion_config("fusion-tiny", image_width=64, text_width=64)).eval()
    return save_reranker(model, tmp_path_factory.mktemp("rr") / "reranker.safetensors")


@pytest.mark.parametrize("with_store,quick_start", [(False, False), (True, False), (True, True)])
def test_exported_graphs_give_torch_features(tmp_path, reranker_path, with_store, quick_start):
    spec = resolve_model("itm-tiny", "random", reranker=reranker_path if with_store else None)
    ours = load_item_encoder(spec, Runtime("onnx", quick_start=quick_start))
    theirs = load_item_encoder(spec, Runtime("torch"))
    assert isinstance(ours, OnnxItemEncoder) and isinstance(theirs, TorchItemEncoder)
    assert ours.identity == theirs.identity and ours.store == theirs.store
    paths = write_images(tmp_path, 5, size=(45, 70))
    pixels = [ours.load_pixels(p) for p in paths]
    assert all(np.array_equal(a, theirs.load_pixels(p)) for a, p in zip(pixels, paths))
    for a, b in ((ours.encode_images(np.stack(pixels)), theirs.encode_images(np.stack(pixels))),
                 (ours.encode_images(pixels[0][None]), theirs.encode_images(pixels[0][None])),
                 (ours.encode_texts(TEXTS), theirs.encode_texts(TEXTS)),
                 (ours.encode_texts(TEXTS[1:2]), theirs.encode_texts(TEXTS[1:2]))):
        assert a.emb.dtype == np.float32 and a.emb.shape == b.emb.shape
        np.testing.assert_allclose(a.emb, b.emb, rtol=0, atol=1e-5)
        assert (a.tok is None) == (b.tok is None) == (not with_store)
        if with_store:  # stored as fp16: a difference of 1e-7 may flip the last bit of a rounded value
            assert a.tok.dtype == np.float16 and a.tok.shape == b.tok.shape
            np.testing.assert_allclose(a.tok.astype(np.float32), b.tok.astype(np.float32), rtol=2**-10, atol=1e-5)
        assert (a.mask is None and b.mask is None) or np.array_equal(a.mask, b.mask)


def test_an_export_is_made_once_and_found_by_the_model_identity(monkeypatch, tiny_spec):
    first = load_item_encoder(tiny_spec, Runtime("onnx"))
    monkeypatch.setattr(onnx_export, "export_encoder", lambda *a: pytest.fail("exported twice"))
    again = load_item_encoder(tiny_spec, Runtime("onnx"), known=first.identity)
    assert again.folder == first.folder == export_cache.export_dir("encoder", onnx_items.encoder_key(tiny_spec))
    assert {p.name for p in again.folder.iterdir()} >= {"encoder.json", "image.onnx", "text.onnx", "tokenizer.json"}


def test_a_model_that_does_not_export_runs_on_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("ITM_CACHE_DIR", str(tmp_path / "cache"))
    spec = resolve_model("itm-tiny", "random")
    calls = []

    def refuse(spec, folder):
        calls.append(folder)
        raise ExportError("itm-tiny/random: not this one")

    monkeypatch.setattr(onnx_export, "export_encoder", refuse)
    assert isinstance(load_item_encoder(spec), TorchItemEncoder)
    assert isinstance(load_item_encoder(spec), TorchItemEncoder) and len(calls) == 1  # the refusal is remembered
    with pytest.raises(ExportError, match="not this one"):
        load_item_encoder(spec, Runtime("onnx"))
    assert not list((tmp_path / "cache" / "onnx").glob("encoder-*/"))  # no half-made folder is left


def test_gpu_and_bf16_run_on_torch_and_bad_choices_are_refused():
    assert not Runtime(precision="bf16").wants_onnx and not Runtime(device="cuda").wants_onnx
    assert Runtime().wants_onnx and not Runtime("torch").wants_onnx
    with pytest.raises(ItmError, match="onnx backend runs on a CPU in fp32 or int8"):
        Runtime("onnx", precision="bf16").wants_onnx
    with pytest.raises(ItmError, match="unknown backend 'tensorrt'"):
        Runtime("tensorrt")
    with pytest.raises(ItmError, match="threads must be at least 1"):
        Runtime(threads=0)


def test_an_unwritable_cache_runs_on_torch(monkeypatch, tmp_path, tiny_spec):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("ITM_CACHE_DIR", str(tmp_path / "file" / "cache"))  # under a file: nothing can be made
    assert isinstance(load_item_encoder(tiny_spec), TorchItemEncoder)
    with pytest.raises(ExportError, match="set ITM_CACHE_DIR to a writable folder"):
        load_item_encoder(tiny_spec, Runtime("onnx"))


def test_int8_graphs_are_quantized_stay_close_to_fp32_and_are_made_once(monkeypatch, tmp_path, reranker_path):
    spec = resolve_model("itm-tiny", "random", reranker=reranker_path)
    fp32 = load_item_encoder(spec, Runtime("onnx"))
    int8 = load_item_encoder(spec, Runtime(precision="int8"))
    reduce = onnx_items.int8_reduce_range()
    key = onnx_items.int8_key(onnx_items.encoder_key(spec), reduce)
    assert int8.folder == export_cache.export_dir("encoder-int8", key)
    assert json.loads((int8.folder / "encoder.json").read_text())["int8"]["reduce_range"] == reduce
    assert int8.identity == fp32.identity and int8.store == fp32.store
    for tower in ("image", "text"):
        ops = {n.op_type for n in onnx.load(int8.folder / f"{tower}.onnx", load_external_data=False).graph.node}
        assert "MatMulInteger" in ops and "MatMulInteger" not in {
            n.op_type for n in onnx.load(fp32.folder / f"{tower}.onnx", load_external_data=False).graph.node}
    pixels = np.stack([fp32.load_pixels(p) for p in write_images(tmp_path, 4, size=(45, 70))])
    for a, b in ((fp32.encode_images(pixels), int8.encode_images(pixels)),
                 (fp32.encode_texts(TEXTS), int8.encode_texts(TEXTS))):
        cos = (a.emb * b.emb).sum(1)  # unit embeddings
        assert cos.min() > 0.999 and not np.array_equal(a.emb, b.emb), cos
        assert b.tok.dtype == np.float16 and b.tok.shape == a.tok.shape
        np.testing.assert_allclose(b.tok.astype(np.float32), a.tok.astype(np.float32), rtol=0, atol=0.1)
        assert (a.mask is None and b.mask is None) or np.array_equal(a.mask, b.mask)
    monkeypatch.setattr(onnx_export, "quantize_export", lambda *a: pytest.fail("quantized twice"))
    assert load_item_encoder(spec, Runtime(precision="int8"), known=fp32.identity).folder == int8.folder


def test_int8_that_strays_from_fp32_is_refused_once_and_never_runs_on_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("ITM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_export, "INT8_MIN_COSINE", 1.01)  # no int8 graph can be this close
    calls = []
    quantize = onnx_export.quantize_export
    monkeypatch.setattr(onnx_export, "quantize_export", lambda *a: calls.append(a) or quantize(*a))
    spec = resolve_model("itm-tiny", "random")
    for _ in range(2):
        with pytest.raises(ExportError, match="int8 embeddings stray from fp32's .*use --precision fp32"):
            load_item_encoder(spec, Runtime(precision="int8"))
    assert len(calls) == 1  # the refusal is remembered
    assert not list((tmp_path / "cache" / "onnx").glob("encoder-int8-*/"))
    assert isinstance(load_item_encoder(spec), OnnxItemEncoder)  # fp32 is unaffected


def test_int8_runs_only_as_onnx_on_a_cpu():
    assert Runtime(precision="int8").wants_onnx and Runtime("onnx", precision="int8").wants_onnx
    for runtime in (Runtime("torch", precision="int8"), Runtime(device="cuda", precision="int8")):
        with pytest.raises(ItmError, match="--precision int8 runs the onnx backend on a CPU"):
            runtime.wants_onnx


def test_int8_weights_keep_to_7_bits_where_int8_products_can_saturate(monkeypatch):
    """x86 without VNNI adds u8 x s8 pairs in 16 bits: 7-bit weights there; 8 bits with VNNI and off x86."""
    assert onnx_items.int8_reduce_range(frozenset("flags : fpu sse2 avx avx2 fma".split()))
    assert onnx_items.int8_reduce_range(frozenset("flags : avx2 avx512f avx512bw".split()))
    assert not onnx_items.int8_reduce_range(frozenset("flags : avx2 avx512f avx512_vnni".split()))
    assert not onnx_items.int8_reduce_range(frozenset("flags : avx2 avx_vnni".split()))
    assert not onnx_items.int8_reduce_range(frozenset("Features : fp asimd asimddp".split()))  # Arm
    assert onnx_items.int8_key("k", True) != onnx_items.int8_key("k", False) == "k"
    monkeypatch.setattr(onnx_items, "cpu_flags", lambda: None)  # not Linux: 7 bits, safe everywhere
    assert onnx_items.int8_reduce_range()
