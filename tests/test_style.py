"""ruff keeps the format and the lint rules configured in pyproject.toml (line length 120; E, F, I, B), and no
test module imports another."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["lm_eval_taskvec", "tests", "benchmarks", "scripts"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing(command):
    done = subprocess.run([sys.executable, "-m", "ruff", *command, *SOURCES], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, by its absolute name within tests/ (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "tests" + ("." + node.module if node.module else "") if node.level else node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # from tests import test_cli
    return names


def is_test_module(name: str) -> bool:
    parts = name.split(".")
    local = parts[0] == "tests" or parts[0] == "conftest" or parts[0].startswith("test_")
    return local and any(part == "conftest" or part.startswith("test_") for part in parts)


def test_no_test_module_imports_another_test_module_or_the_conftest():
    """What test modules share lives in tests/helpers.py and tests/tasks.py (fixtures in the conftest)."""
    offenders = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        bad = sorted(name for name in imported_modules(path) if is_test_module(name))
        if bad:
            offenders[path.name] = bad
    assert offenders == {}


def test_the_import_check_sees_each_way_of_importing_a_test_module(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import tests.test_cli\nfrom tests.test_patching import GEN\nfrom tests import test_selection\n"
        "from . import conftest\nfrom .test_errors import x\nimport test_layers\n"
        "from tests.helpers import GEN\nfrom tests.tasks import make_task\nimport torch.testing\n"
    )
    flagged = {name for name in imported_modules(probe) if is_test_module(name)}
    assert {"tests.test_cli", "tests.test_patching", "tests.test_selection", "tests.conftest"} <= flagged
    assert {"tests.test_errors", "test_layers"} <= flagged
    assert not any("helpers" in name or "tasks" in name or "torch" in name for name in flagged)
