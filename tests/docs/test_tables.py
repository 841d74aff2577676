"""The documents' figure tables are what benchmarks/results/*.json say, and the README stays a manual.

benchmarks/tables.py regenerates every table between `<!-- table: NAME -->` markers; its --check
mode must pass on the committed documents and must fail, naming the table, on a document whose
table was edited by hand.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLES = ROOT / "benchmarks" / "tables.py"
RESULTS = ROOT / "benchmarks" / "results"
README_MAX_LINES = 250
# CI runs the second line exactly as the README writes it (.ci/run); the first is the quickstart.
QUICKSTART = ("pip install -e . && itm-index build data/samples/images --model demo --index /tmp/itm-demo && "
              "itm-index build data/samples/captions.txt --index /tmp/itm-demo && "
              "itm-search \"a red circle left of a blue square\" --index /tmp/itm-demo -k 5")
TESTS = ("apt-get update && apt-get install -y chromium chromium-driver && "
         "pip install -e '.[test,server,ray]' && python -m pytest -q")


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TABLES), "--check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)


def test_every_table_matches_its_json():
    r = check()
    assert r.returncode == 0, r.stderr


def test_a_table_edited_by_hand_fails_the_check(tmp_path):
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    assert check("--root", str(tmp_path), "--results", str(RESULTS)).returncode == 0  # the copy alone passes
    doc = tmp_path / "docs" / "benchmarks.md"
    text = doc.read_text()
    table = re.search(r"<!-- table: vs-rclip -->\n(.*?)<!-- /table -->", text, re.DOTALL)
    assert table
    head, rule, first, rest = table.group(1).split("\n", 3)  # the first row of figures
    digit = re.search(r"\d", first)
    changed = first[:digit.start()] + str((int(digit.group()) + 1) % 10) + first[digit.end():]
    doc.write_text(f"{text[:table.start(1)]}{head}\n{rule}\n{changed}\n{rest}{text[table.end(1):]}")
    r = check("--root", str(tmp_path), "--results", str(RESULTS))
    assert r.returncode == 1
    assert "docs/benchmarks.md: table vs-rclip differs" in r.stderr


def test_the_readme_is_a_manual_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES
    commands = [line.strip() for line in lines if line.startswith("    ")]
    assert QUICKSTART in commands
    assert TESTS in commands
    first_search = next(line for line in lines if "itm-search" in line)
    assert first_search.strip() == QUICKSTART  # the quickstart test reads its query from the first such line


def test_ci_runs_the_readme_test_command_as_written():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == TESTS
