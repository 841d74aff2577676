"""The rooms and their arrows, read from the code (docs/architecture.md): one-way arrows between rooms, no import
loop between modules (lazy imports inside functions count), no edits of the import path, benchmarks that import no tests."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = {"itm": "itm", "common": "common", "models": "models", "indexer": "indexer", "retrieval": "retrieval",
         "training": "training", "data": "data"}  # folder -> itm.<room> (pyproject's package-dir)
# room -> the rooms it may import; `itm` is the package's face, the Python API over the others
ALLOWED = {
    "common": set(),
    "data": {"common"},
    "models": {"common"},
    "indexer": {"models", "common"},
    "retrieval": {"indexer", "models", "common"},
    "training": {"retrieval", "indexer", "models", "data", "common"},
    "itm": {"retrieval", "indexer", "models", "common"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    room, *rest = rel.parts
    parts = (["itm"] if room == "itm" else ["itm", room]) + rest
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for room in ROOMS for p in (ROOT / room).rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every itm module `path` imports, at its top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, name, set(mods)) for name, path in mods.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "itm"


def test_arrows_between_rooms_point_one_way():
    wrong = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets
             if _room(a) != _room(b) and _room(b) not in ALLOWED[_room(a)]]
    assert not wrong, wrong


def test_no_import_loop_between_modules():
    graph = _graph()
    # package __init__ files that only hand names on lazily are faces, not rooms: their arrows make no loop
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (loop := visit(n)):
                return loop
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            loop = visit(m)
            assert loop is None, " -> ".join(loop)


def test_the_checker_finds_a_loop_and_a_wrong_arrow(tmp_path):
    """The two checks above can fail: a planted loop and a planted upward import are seen."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from itm.models import b\n")
    b.write_text("from . import a\n")
    known = {"itm.models.a", "itm.models.b", "itm.indexer.build"}
    assert _imports(a, "itm.models.a", known) == {"itm.models.b"}
    assert _imports(b, "itm.models.b", known) == {"itm.models.a"}
    b.write_text("from itm.indexer.build import build_index\n")
    target = _imports(b, "itm.models.b", known)
    assert target == {"itm.indexer.build"} and "indexer" not in ALLOWED[_room("itm.models.b")]


@pytest.mark.parametrize("folder", sorted(ROOMS) + ["tests", "benchmarks"])
def test_nothing_edits_sys_path(folder):
    edits = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / folder).rglob("*.py") if p != Path(__file__)
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"sys\.path\.(insert|append)|PYTHONPATH", line)]
    assert not edits, edits


def test_benchmarks_import_no_tests():
    found = [str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").rglob("*.py")
             if re.search(r"^\s*(from|import)\s+tests\b", p.read_text(), re.M)]
    assert not found, found


def test_the_product_imports_neither_tests_nor_benchmarks():
    found = [str(p.relative_to(ROOT)) for room in ROOMS for p in (ROOT / room).rglob("*.py")
             if re.search(r"^\s*(from|import)\s+(tests|benchmarks)\b", p.read_text(), re.M)]
    assert not found, found
