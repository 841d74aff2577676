"""ONNX Runtime sessions as itm runs them: on the CPU, a chosen number of threads, no spinning."""
from __future__ import annotations

from pathlib import Path


def open_session(path: Path, threads: int, quick_start: bool = False):
    """An onnxruntime.InferenceSession over the graph at `path`.

    Idle threads sleep instead of spinning: a build decodes images in threads of its own beside
    the forward pass, and on a small machine a spinning pool takes their cores. `quick_start`
    is for a process that runs the graph a few times (one query from the shell): the weights
    stay in the memory-mapped file instead of being repacked for the matrix kernels, which
    takes most of a session's start-up (a tenth of a second for ViT-B-32's text tower) and
    pays off only over many runs.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: its warnings are about graph rewrites, not about the user's data
    if quick_start:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
