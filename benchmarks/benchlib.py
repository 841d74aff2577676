"""Shared pieces of the benchmark scripts: machine facts, percentiles, a plain table, JSON output,
and generated inputs (photo-like images, captions).

Not a benchmark itself. The scripts beside it import it as `benchlib` (they run as
`python benchmarks/NAME.py`: Python looks for imports in a script's own folder first).
"""
from __future__ import annotations

import ctypes
import glob
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RESULTS_DIR = Path(__file__).resolve().parent / "results"
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "OPENBLAS_CORETYPE")  # recorded when set: each changes the figures
Column = tuple[str, str, str]  # (key in the row, header, format spec such as ".1f")


def default_out(script: str) -> Path:
    return RESULTS_DIR / f"{Path(script).stem}.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_family_model() -> str | None:
    """'family F model M' from /proc/cpuinfo: the name alone ('AMD EPYC') can hide the generation."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        return f"{fields['vendor_id']} family {fields['cpu family']} model {fields['model']}"
    except (OSError, KeyError):
        return None


def openblas_core() -> str | None:
    """The kernel set the OpenBLAS bundled with faiss-cpu picked at load time (None if not found)."""
    import faiss

    libs = glob.glob(os.path.join(os.path.dirname(faiss.__file__), "..", "faiss_cpu.libs", "libopenblas*"))
    if not libs:
        return None
    try:
        lib = ctypes.CDLL(libs[0])  # already loaded by faiss: the same handle, the same choice
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        return None


def set_torch_threads(n: int | None) -> None:
    """Intra-op threads of the calling thread (threads started later keep torch's default)."""
    if n:
        import torch

        torch.set_num_threads(n)


def machine_facts() -> dict[str, Any]:
    """What the figures depend on; call at the start of a run, then `finish` at the end."""
    import faiss
    import open_clip
    import PIL
    import torch

    return {
        "cpu_model": cpu_model(),
        "cpu_family_model": cpu_family_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "open_clip": open_clip.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "openblas_core": openblas_core(),
        "loadavg_start": list(os.getloadavg()),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def finish(facts: dict[str, Any]) -> dict[str, Any]:
    return {**facts, "loadavg_end": list(os.getloadavg())}


def rss_bytes() -> int:
    """This process's resident memory (VmRSS), or -1 where /proc/self/status does not give it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return -1


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[Column]) -> str:
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else format(r[k], f) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_machine(facts: dict[str, Any]) -> str:
    load = lambda k: "/".join(f"{x:.2f}" for x in facts[k]) if k in facts else "?"  # noqa: E731
    return (f"{facts['cpu_model']} ({facts['cpu_family_model']}), {facts['cpus_usable']} cores, "
            f"torch {facts['torch']} x{facts['torch_threads']} threads, faiss {facts['faiss']} "
            f"(OpenBLAS core {facts['openblas_core']}, OPENBLAS_CORETYPE={facts['OPENBLAS_CORETYPE']}), "
            f"load avg {load('loadavg_start')} -> {load('loadavg_end')}"
            + "".join(f", {k}={v}" for k, v in facts.get("env", {}).items() if k != "OPENBLAS_CORETYPE"))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


# ---- generated inputs ---------------------------------------------------------------------

def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth gradient, flat-coloured shapes with soft edges, coarse and fine texture, mild noise."""
    corners = Image.fromarray(rng.integers(0, 256, (2, 2, 3), dtype=np.uint8))
    im = corners.resize((width, height), Image.BILINEAR)  # a smooth four-corner gradient
    draw = ImageDraw.Draw(im)
    side = min(width, height)
    for _ in range(int(rng.integers(8, 25))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.03, 0.3, 2) * side
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        elif kind == 1:
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
            draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles], fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(max(0.5, side / 1500)))  # edges as soft as a lens makes them
    pixels = np.asarray(im, dtype=np.int16)  # (H, W, 3)
    pixels += (_texture(rng, width, height, 24) - 128)[..., None] // 6  # lighting-scale variation
    pixels += ((_texture(rng, width, height, 3) - 128) * 40 // 256)[..., None]  # fine detail
    pixels += rng.integers(-6, 7, pixels.shape, dtype=np.int8)  # sensor-like noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _texture(rng: np.random.Generator, width: int, height: int, scale: int) -> np.ndarray:
    small = rng.integers(0, 256, (max(1, height // scale), max(1, width // scale)), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)


SUBJECTS = ["dog", "cat", "red car", "old bicycle", "woman in a blue coat", "child", "wooden boat",
            "yellow taxi", "mountain lake", "bowl of ramen", "lighthouse", "street market", "horse", "laptop"]
PLACES = ["on a beach", "in the snow", "at night", "next to a window", "in a busy street", "under a tree",
          "on a wooden table", "in the rain", "at sunset", "in a kitchen"]
STYLES = ["a photo of", "a close-up of", "a blurry picture of", "two", "a black and white photo of", ""]


def captions(n: int, seed: int = 0) -> list[str]:
    """Short varied captions, the same for the same seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        parts = [STYLES[rng.integers(len(STYLES))], SUBJECTS[rng.integers(len(SUBJECTS))],
                 PLACES[rng.integers(len(PLACES))]]
        if rng.random() < 0.3:
            parts.append(f"with a {SUBJECTS[rng.integers(len(SUBJECTS))]} behind it")
        out.append(" ".join(p for p in parts if p))
    return out


def start_server(argv: list[str], index: Path, env: dict[str, str] | None = None,
                 timeout_s: float = 600) -> subprocess.Popen:
    """`argv` (an itm-serve command) serving `index` on a free port, once it has announced itself to itm-search."""
    from itm.retrieval.discovery import find_server

    proc = subprocess.Popen([*argv, "--index", str(index), "--port", "0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout_s
    while (found := find_server(index)) is None or found.pid != proc.pid:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"itm-serve did not start: {proc.communicate()[1].decode(errors='replace')}")
        time.sleep(0.1)
    return proc
