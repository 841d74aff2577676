"""Where itm keeps things on a machine: the default index, the per-user cache, the servers' announcements,
the bundled demo model. Every environment variable that moves one of them is read here.

    ITM_INDEX          the index both commands use         else $XDG_DATA_HOME/itm/index (~/.local/share/itm/index)
    ITM_CACHE_DIR      exported ONNX graphs                else $XDG_CACHE_HOME/itm (~/.cache/itm)
    XDG_RUNTIME_DIR    running servers' announcements      under it: itm/; else $TMPDIR/itm-<uid>, /tmp/itm-<uid>
    ITM_DEMO_DIR       the `demo` bundle's folder          else the one installed with itm (itm.data, demo/)
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path


def default_index_dir() -> Path:
    """ITM_INDEX, else the per-user data directory ($XDG_DATA_HOME/itm/index)."""
    if os.environ.get("ITM_INDEX"):
        return Path(os.environ["ITM_INDEX"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "itm" / "index"


def cache_root() -> Path:
    """ITM_CACHE_DIR, else $XDG_CACHE_HOME/itm: what itm makes once per model (exported graphs)."""
    if os.environ.get("ITM_CACHE_DIR"):
        return Path(os.environ["ITM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "itm"


def runtime_dir() -> Path:
    """Where a running itm-serve announces itself to itm-search: private to the user."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "itm"
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"itm-{os.getuid()}"


def demo_dir() -> Path:
    """ITM_DEMO_DIR, else the demo bundle installed as package data (found by importlib.resources)."""
    return Path(os.environ.get("ITM_DEMO_DIR") or str(files("itm.data") / "demo"))
