"""What the command-line tools share: turning library errors into one line and an exit code."""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

import typer

from .errors import ItmError, ItmWarning


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
        typer.echo(f"{prog}: error: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"{prog}: interrupted", err=True)
        raise typer.Exit(130) from None


def warn(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr)
