"""Exporting a dual encoder (and its reranker's store encoder) to ONNX, checked against torch before use.

Each tower is traced once with its store projection on top, so that one ONNX Runtime call gives
what the index stores for a batch (models/onnx_items.py runs them). The text graph takes ids
cut after the batch's last end-of-text token, as DualEncoder does for causal text towers, so its
length axis is dynamic. Before the folder is published, the graphs, the tokenizer and the image
preparation are compared with open_clip's on a few inputs; a model that fails raises ExportError
and runs on the torch backend instead.
"""
from __future__ import annotations

import inspect
import io
import json
import logging
import shutil
import warnings
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import default_bpe
from PIL import Image

from itm.common.errors import ExportError

from .encoder import DualEncoder
from .onnx_items import META, TOWERS, OnnxItemEncoder
from .preprocess import INTERPOLATIONS, OPENAI_MEAN, OPENAI_STD, RESIZE_MODES, ImagePrep
from .registry import ModelSpec
from .store_encoder import LoadedStoreEncoder, StoreEncoder, load_store_encoder
from .tokenizer import ClipTokenizer

INT8_OPS = ["MatMul", "Gemm"]  # what is quantized; a quantized Conv (the patch embedding) ran slower here
INT8_MIN_COSINE = 0.99  # an int8 graph whose embeddings stray further from fp32's on the check inputs is refused

OPSET = 18
MAX_BATCH = 4096  # largest batch the graphs take
TOLERANCE = 1e-4  # largest difference from torch allowed in the check, on unit embeddings and store features
FP16_STEP = 2.0**-10  # relative spacing of fp16 values: one rounding step of a stored feature
CHECK_TEXTS = ("a red circle left of a blue square", "Two DOGS & a cat, naïve café!", "x")  # and each alone


class _TextGraph(torch.nn.Module):
    def __init__(self, dual: DualEncoder, store: StoreEncoder | None, layers: tuple[int, ...]):
        super().__init__()
        self.model, self.store, self.dual = dual.model, store, dual
        self.layers = [i % dual.n_text_layers for i in layers]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor):
        pooled, tokens = self.dual._text_tower(ids, self.layers)  # (B, E), Lt x (B, n, Wt)
        emb = F.normalize(pooled.float(), dim=-1)
        if self.store is None:
            return emb
        feats, keep = self.store.encode_texts([t.float() for t in tokens], mask)  # (B, Lt, Tt, D), (B, Tt)
        return emb, feats, keep


class _ImageGraph(torch.nn.Module):
    def __init__(self, dual: DualEncoder, store: StoreEncoder | None, layers: tuple[int, ...]):
        super().__init__()
        self.model, self.store, self.dual, self.layers = dual.model, store, dual, layers

    def forward(self, pixels: torch.Tensor):
        out = self.dual._images(pixels, self.layers)
        if self.store is None:
            return out.embeddings
        return out.embeddings, self.store.encode_images([t.float() for t in out.tokens], out.grid)


def export_encoder(spec: ModelSpec, folder: Path) -> None:
    """Write text.onnx, image.onnx, tokenizer.json and encoder.json for `spec` into `folder`."""
    dual = DualEncoder.load(spec)
    store = load_store_encoder(spec.reranker, dual) if spec.reranker else None
    tokenizer, prep = _tokenizer(dual), _image_prep(dual)
    tokenizer.save(folder / "tokenizer.json")
    module = store.module if store else None
    text = _TextGraph(dual, module, store.text_layers if store else ())
    image = _ImageGraph(dual, module, store.image_layers if store else ())
    s = dual.image_size
    with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")  # the exporters' notes on how they trace
        ids = torch.full((2, 5), dual.tokenizer.eot_token_id, dtype=torch.long)
        _export(text, (ids, torch.ones(2, 5, dtype=torch.bool)), ["ids", "mask"], folder / "text.onnx",
                ["out_embedding", "out_store", "out_keep"] if store else ["out_embedding"],
                length=dual.identity.context_length)
        _export(image, (torch.zeros(2, 3, s, s),), ["pixels"], folder / "image.onnx",
                ["out_embedding", "out_store"] if store else ["out_embedding"])
    identity = replace(dual.identity, name=None, checkpoint=None)
    meta = {"identity": asdict(identity), "prep": asdict(prep), "context_length": identity.context_length,
            "store": _store_meta(store)}
    (folder / META).write_text(json.dumps(meta, indent=1) + "\n")
    _check(folder, spec, dual, store, tokenizer, prep)


def _export(module: torch.nn.Module, args: tuple, inputs: list[str], path: Path, outputs: list[str],
            length: int | None = None) -> None:
    """torch.export's exporter, with a dynamic batch axis and, for texts, a dynamic length axis up to `length`.

    (The TorchScript exporter records the text length of the example as a constant inside
    nn.MultiheadAttention, so a text graph from it would take one length only.)
    """
    from torch.export import Dim

    batch = Dim("batch", min=1, max=MAX_BATCH)
    axes = {0: batch, 1: Dim("length", min=2, max=length)} if length else {0: batch}
    dynamic = {name: axes for name in inspect.signature(module.forward).parameters}
    try:
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_shapes=dynamic, opset_version=OPSET, dynamo=True, verbose=False)
    except Exception as e:  # an architecture or a torch the exporter cannot handle: the torch backend runs it
        raise ExportError(f"cannot export {path.stem} graph ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "it runs on the torch backend") from None


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs each step at INFO and prints a summary; a build's progress bar is no place for them."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _store_meta(store: LoadedStoreEncoder | None) -> dict | None:
    if store is None:
        return None
    return {"sha256": store.sha256, "image_shape": list(store.image_shape), "text_shape": list(store.text_shape),
            "image_layers": list(store.image_layers), "text_layers": list(store.text_layers)}


def _tokenizer(dual: DualEncoder) -> ClipTokenizer:
    if not isinstance(dual.tokenizer, open_clip.SimpleTokenizer) or not dual._causal_argmax_text:
        raise ExportError(f"{dual.identity.label}: only CLIP-style text towers (open_clip's SimpleTokenizer, causal "
                          "mask, pooled at the end of text) are exported; it runs on the torch backend")
    return ClipTokenizer.from_open_clip(Path(default_bpe()), dual.identity.context_length)


def _image_prep(dual: DualEncoder) -> ImagePrep:
    pp = open_clip.get_model_preprocess_cfg(dual.model)
    size = dual.model.visual.image_size
    mode, interpolation = pp.get("resize_mode") or "shortest", pp.get("interpolation") or "bicubic"
    if isinstance(size, (tuple, list)) and size[0] != size[1] or mode not in RESIZE_MODES \
            or interpolation not in INTERPOLATIONS:
        raise ExportError(f"{dual.identity.label}: image preparation {size}/{mode}/{interpolation} is not "
                          "supported by the onnx backend; it runs on the torch backend")
    return ImagePrep(dual.image_size, tuple(pp.get("mean") or OPENAI_MEAN), tuple(pp.get("std") or OPENAI_STD),
                     interpolation, mode)


def _check(folder: Path, spec: ModelSpec, dual: DualEncoder, store: LoadedStoreEncoder | None,
           tokenizer: ClipTokenizer, prep: ImagePrep) -> None:
    """The exported graphs, tokenizer and image preparation against torch and open_clip, or ExportError."""

    from .torch_items import TorchItemEncoder

    for text in CHECK_TEXTS:
        if tokenizer([text]).tolist() != dual.tokenizer([text]).tolist():
            raise ExportError(f"{dual.identity.label}: the tokenizer does not match open_clip's on {text!r}")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (dual.image_size + 7, dual.image_size * 2, 3), dtype=np.uint8))
    if not np.array_equal(prep(image), dual.prepare(image).numpy()):
        raise ExportError(f"{dual.identity.label}: image preparation does not match open_clip's")
    ours, theirs = OnnxItemEncoder(folder, spec, threads=1), TorchItemEncoder(dual, store)
    pixels = np.stack([prep(image), prep(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    pairs = [(ours.encode_texts(t), theirs.encode_texts(t)) for t in (CHECK_TEXTS, *([t] for t in CHECK_TEXTS))]
    pairs += [(ours.encode_images(p), theirs.encode_images(p)) for p in (pixels, pixels[:1])]
    for a, b in pairs:
        # store features are rounded to fp16, where a difference of 1e-7 can flip the last bit
        if not np.allclose(a.emb, b.emb, rtol=0, atol=TOLERANCE) or a.tok is not None and not np.allclose(
                a.tok.astype(np.float32), b.tok.astype(np.float32), rtol=FP16_STEP, atol=TOLERANCE):
            raise ExportError(f"{dual.identity.label}: the exported graphs differ from torch; "
                              "it runs on the torch backend")
        if a.mask is not None and not np.array_equal(a.mask, b.mask):
            raise ExportError(f"{dual.identity.label}: the exported text mask differs from torch's")


def quantize_export(src: Path, out: Path, spec: ModelSpec, reduce_range: bool = False) -> None:
    """Write into `out` the graphs of export folder `src` with int8 matrix products, checked against them
    (`reduce_range`: 7-bit weights, for CPUs whose int8 products saturate; `int8_reduce_range`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for tower in TOWERS:
        try:
            with _quiet_quantizer():
                quantize_dynamic(src / f"{tower}.onnx", out / f"{tower}.onnx", weight_type=QuantType.QInt8,
                                 per_channel=True, reduce_range=reduce_range, op_types_to_quantize=INT8_OPS,
                                 use_external_data_format=True)
        except Exception as e:  # an operator or a graph the quantizer does not handle
            raise ExportError(f"cannot quantize the {tower} graph to int8 ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); use --precision fp32") from None
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    meta = json.loads((src / META).read_text())
    how = {"ops": INT8_OPS, "per_channel": True, "reduce_range": reduce_range}
    (out / META).write_text(json.dumps({**meta, "int8": how}, indent=1) + "\n")
    fp32, int8 = OnnxItemEncoder(src, spec, threads=1), OnnxItemEncoder(out, spec, threads=1)
    rng = np.random.default_rng(0)
    size = fp32.prep.size
    pixels = np.stack([fp32.prep(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
                       for _ in range(2)])
    texts = ["a red circle left of a blue square", "a photo of a dog on a beach"]
    for a, b in ((fp32.encode_images(pixels), int8.encode_images(pixels)),
                 (fp32.encode_texts(texts), int8.encode_texts(texts))):
        cosine = float((a.emb * b.emb).sum(1).min())  # unit embeddings
        if cosine < INT8_MIN_COSINE:
            raise ExportError(f"{int8.identity.label}: int8 embeddings stray from fp32's (cosine {cosine:.3f} < "
                              f"{INT8_MIN_COSINE}); use --precision fp32")


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizer advises its pre-processing step through the root logger: no place for it in a build's output."""
    before = logging.root.manager.disable  # a level the application disabled stays disabled afterwards
    logging.disable(max(before, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(before)
