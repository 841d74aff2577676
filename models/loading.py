"""Loading a model to run it: the exported graphs in ONNX Runtime where they serve, else torch.

A model's graphs are exported once, on first use, into the per-user cache (models/export_cache.py),
and its int8 copy quantized from them; later loads read the cache and import neither torch nor
open_clip. Both item encoders and both fusion scorers answer through one interface each
(models/item_encoder.py, models/fusion_scorer.py), so the build and the search never ask which runs.

    >>> encoder = load_item_encoder(resolve_model("demo"))
    >>> scorer = load_fusion(reranker_path, sha256)
"""
from __future__ import annotations

from pathlib import Path

from itm.common.errors import ExportError

from . import export_cache
from .checkpoint import file_sha256
from .fusion_scorer import KIND as FUSION_KIND
from .fusion_scorer import FusionScorer, OnnxFusion, TorchFusion
from .identity import ModelIdentity
from .item_encoder import ItemEncoder, Runtime, default_threads
from .onnx_items import INT8_KIND, OnnxItemEncoder, encoder_key, int8_key, int8_reduce_range
from .onnx_items import KIND as ENCODER_KIND
from .registry import ModelSpec


def load_item_encoder(spec: ModelSpec, runtime: Runtime = Runtime(), known: ModelIdentity | None = None,
                      reranker_sha256: str | None = None) -> ItemEncoder:
    """The item encoder of `spec` (and of its reranker's store encoder, when it has one).

    `known` and `reranker_sha256` are what an index's manifest says about the model, which saves
    hashing the checkpoint files to find the model's export.
    """
    if runtime.wants_onnx:
        try:
            return load_onnx_items(spec, runtime.threads or default_threads(), known, reranker_sha256,
                                   runtime.quick_start, int8=runtime.precision == "int8")
        except ExportError:
            if runtime.backend == "onnx" or runtime.precision == "int8":
                raise
    from .torch_items import TorchItemEncoder  # torch and open_clip

    return TorchItemEncoder.load(spec, runtime.device, runtime.precision, runtime.threads)


def load_onnx_items(spec: ModelSpec, threads: int, known: ModelIdentity | None = None,
                    reranker_sha256: str | None = None, quick_start: bool = False,
                    int8: bool = False) -> OnnxItemEncoder:
    """The model's export from the cache, made first (with torch) when it is not there yet; with
    `int8`, its quantized copy, made first from the export when it is not there yet.

    Raises ExportError when the model cannot be exported or quantized (that is remembered beside the cache).
    """
    def export(folder: Path) -> None:
        from .onnx_export import export_encoder  # torch and open_clip, once per model

        export_encoder(spec, folder)

    def quantize(out: Path) -> None:
        from .onnx_export import quantize_export  # onnxruntime's quantizer, once per model

        quantize_export(folder, out, spec, reduce)

    key = encoder_key(spec, known, reranker_sha256)
    folder = export_cache.exported(ENCODER_KIND, key, export)
    if int8:
        reduce = int8_reduce_range()
        folder = export_cache.exported(INT8_KIND, int8_key(key, reduce), quantize)
    return OnnxItemEncoder(folder, spec, threads, quick_start)


def load_fusion(reranker: Path, sha256: str, runtime: Runtime = Runtime()) -> FusionScorer:
    """The scorer of the reranker checkpoint at `reranker` (whose file hash is `sha256`).

    The export is keyed by the weights' hash and by the checkpoint's JSON (its config, the score
    weight among it): a weight changed beside the same weights file is a new export, not a stale one.
    """
    if runtime.wants_onnx:
        config = reranker.with_suffix(".json")
        key = export_cache.export_key(reranker_sha256=sha256,
                                      config_sha256=file_sha256(config) if config.is_file() else None)
        try:
            folder = export_cache.exported(FUSION_KIND, key, lambda folder: _export_fusion(reranker, sha256, folder))
            return OnnxFusion(folder, runtime.threads or default_threads(), runtime.quick_start)
        except ExportError:
            if runtime.backend == "onnx":
                raise
    from .fusion_checkpoint import load_reranker  # torch

    return TorchFusion(load_reranker(reranker, runtime.device).eval())


def _export_fusion(reranker: Path, sha256: str, folder: Path) -> None:
    from .fusion_export import export_fusion  # torch, once per reranker

    export_fusion(reranker, sha256, folder)
