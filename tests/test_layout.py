"""The package's layers: imports point down (no cycle, nothing below the model class imports it) and no module
but the model class reads a private attribute of a model (``lm._*``)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lm_eval_taskvec"
ABOVE_THE_MODEL = ("lm_eval_taskvec.cli", "lm_eval_taskvec.comparison", "lm_eval_taskvec.analyses")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports (anywhere in the file)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name, deps = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lm_eval_taskvec"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("lm_eval_taskvec")}
        found[name] = deps - {name}
    return {name: {d for d in deps if d in found} for name, deps in found.items()}


def test_the_import_graph_has_no_cycle():
    graph, done, path = imports(), set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name) :] + [name]))
        if name in done:
            return
        path.append(name)
        for dep in graph[name]:
            if not (dep == "lm_eval_taskvec" or name.startswith(dep + ".")):  # a package's own __init__
                visit(dep)
        path.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_only_the_layers_above_the_model_import_it():
    importers = {name for name, deps in imports().items() if "lm_eval_taskvec.model" in deps}
    above = [name for name in importers if name == "lm_eval_taskvec" or name.startswith(ABOVE_THE_MODEL)]
    assert importers and sorted(above) == sorted(importers), importers


def test_no_module_but_the_model_reads_a_models_private_attributes():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "model.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id == "lm"
            ):
                offenders.append(f"{path.name}:{node.lineno} lm.{node.attr}")
    assert not offenders, offenders
