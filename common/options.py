"""Options and the defaults that the library and the commands share, in a module light enough for `--help`."""
from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_MODEL = "ViT-B-32"  # open_clip architecture used when neither the user nor the index names one
DEVICE = "cpu"  # cpu, cuda, cuda:1, ...
PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # fp16 on a GPU only; int8: the onnx backend's quantized graphs
PRECISION = "fp32"
BACKENDS = ("auto", "onnx", "torch")  # how a model runs: exported graphs in ONNX Runtime, or torch (item_encoder.py)
BACKEND = "auto"  # onnx on a CPU in fp32 when the model exports, else torch
DEFAULT_MAX_PIXELS = 100_000_000  # pixel cap (width x height from the header) of an image a build decodes
SEGMENT_ROWS = 2048  # items per segment written by a build or a compaction
COMPACT_AT = 0.25  # share of stored rows that are dead (deleted or replaced) at which a build compacts
DEFAULT_K = 10  # results per kind
DEFAULT_RERANK_K = 50  # candidates the fusion model rescores per query (benchmarks/fusion_latency.py: the cost)
DEFAULT_PORT = 8765  # where itm-serve listens
SERVER_MAX_K = 1000  # most results, and rerank candidates, per kind that one query to a server may ask for
# queries inside a server at once: one answered (its models take one at a time), one waiting; more get 503 at once,
# so that an admitted query waits for at most one other (benchmarks/serve_load.py)
SERVER_MAX_QUERIES = 2


@dataclass(frozen=True)
class RayOptions:
    """A build whose encoding runs as a Ray Data job (indexer/ray_engine.py)."""

    address: str | None = None  # a running cluster ("auto", "ray://host:10001"); None: one started for the build
    actors: int | None = None  # encoder actors; None: one per GPU with --device cuda, else one per cpus_per_actor
    cpus_per_actor: int = 1  # CPUs each actor reserves; its forward pass runs this many threads
    retries: int = 3  # restarts of a dead actor, and retries of its batch, before the build fails


@dataclass(frozen=True)
class BuildOptions:
    batch_size: int = 16  # items per forward pass (on a CPU, 16 ran faster than 64, in half the memory)
    workers: int = max(1, (os.cpu_count() or 1))  # decoding threads (0: decode inline)
    device: str = DEVICE
    precision: str = PRECISION  # fp32 | bf16 | fp16 (GPU) | int8 (onnx backend)
    backend: str = BACKEND  # auto | onnx | torch: how the model runs (models/item_encoder.py)
    threads: int | None = None  # threads of the model's forward pass; None: the cores this process may use
    exclude: tuple[str, ...] = ()  # globs relative to the folder
    include_hidden: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard
    faiss_factory: str | None = None  # None: chosen from corpus size (or kept from the last build)
    recall_target: float = 0.95  # recall@10 vs exact search an IVF index's nprobe is chosen to reach (indexer/ann.py)
    text_column: str | None = None
    id_column: str | None = None
    commit_every: int = SEGMENT_ROWS  # items per staged segment: what an interruption can lose at most
    compact_at: float = COMPACT_AT  # dead share of stored rows that makes the build compact (above 1: never)
    store_dtype: str | None = None  # rerank store of a new index: fp16 (None) or int8 with a scale per token
    ray: RayOptions | None = None  # None: this process encodes; else Ray Data's actors do (pip install 'itm[ray]')
    wait: bool = True  # while another build or compaction writes the index: wait for it (False: refuse at once)
