"""What the command-line tools share: library errors and warnings as one line each, a progress bar."""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

import typer

from .errors import ItmError, ItmWarning
from .options import BACKENDS, PRECISIONS

# help of the options every command that runs a model takes (itm-index build, itm-search, itm-serve, ...)
DEVICE_HELP = "cpu, cuda, cuda:1, ..."
PRECISION_HELP = (f"{', '.join(PRECISIONS)} (fp16 on a GPU only; int8: the onnx backend's graphs with int8 "
                  "matrix products, faster on a CPU, embeddings close to fp32's but not equal).")
BACKEND_HELP = f"{', '.join(BACKENDS)}: exported graphs in ONNX Runtime, or torch (auto: onnx on a CPU in fp32)."
THREADS_HELP = "Threads of the model's forward pass (default: the cores this process may use)."


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """ItmError -> `prog: error: message` on stderr, exit 1; Ctrl-C -> exit 130 without a traceback;
    each ItmWarning -> `prog: warning: message` on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", ItmWarning)
        others = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, ItmWarning):
                warn(prog, f"warning: {message}")
            else:
                others(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        with _errors(prog):
            yield


@contextmanager
def _errors(prog: str) -> Iterator[None]:
    try:
        yield
    except ItmError as e:
        typer.echo(f"{prog}: error: {printable(str(e))}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"{prog}: interrupted", err=True)
        raise typer.Exit(130) from None


def warn(prog: str, message: str) -> None:
    print(f"{prog}: {printable(message)}", file=sys.stderr)


def printable(text: str) -> str:
    """Text for a terminal: a path's bytes that are not UTF-8 (kept as surrogates by os.fsdecode) as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_raw_path(path: str, end: bytes = b"\n") -> None:
    """A path on stdout as its exact bytes and `end`, for programs that open it (`| xargs ...`; with end=b"\0",
    `| xargs -0 ...`, for names that hold newlines)."""
    sys.stdout.buffer.write(os.fsencode(path) + end)
    sys.stdout.buffer.flush()


class Progress:
    """A progress bar on stderr for a library call that reports (done, total), and the call's
    `skipping PATH: reason` lines, each printed on a line of its own above the bar."""

    def __init__(self, prog: str, what: str, enabled: bool = True):
        self.prog, self.what, self.enabled = prog, what, enabled
        self.bar = None

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None or self.bar.total != total:
            from tqdm import tqdm  # only a build that has something to do shows a bar

            self.close()
            self.bar = tqdm(total=total, desc=self.what, unit="item", smoothing=0.1, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def skip(self, path, reason: str) -> None:
        from tqdm import tqdm

        tqdm.write(printable(f"{self.prog}: skipping {path}: {reason}"), file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
