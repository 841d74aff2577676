"""Lazy re-exports for a package's __init__.py: a name's module is imported on first use of the name."""
from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level __getattr__ that imports `package.<exports[name]>` (or the absolute module
    `exports[name]` when it starts with "itm.") when `name` is first used, so that importing the
    package (and `--help`) does not wait for torch."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            module = exports[name]
            return getattr(import_module(module if module.startswith("itm.") else f".{module}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
