"""The package's layers: every import points down (or within a layer), modules form no cycle, and the
layers that promise not to load torch keep that promise.

Layers, bottom to top (README, "Module map"): shared modules < config < labels < model < data <
evaluation < train < workflows < the CLI and the public API. Imports are read from the source with
``ast``, function-level (lazy) and ``TYPE_CHECKING`` imports included: a lazy import is still a
dependency, it only moves when it is paid for.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

PACKAGE = ROOT / "mace_mf"
LAYERS = [
    ("shared", ("mace_mf.errors", "mace_mf.files", "mace_mf.quiet", "mace_mf.run_folder", "mace_mf.version")),
    ("config", ("mace_mf.config",)),
    ("labels", ("mace_mf.labels",)),
    ("model", ("mace_mf.model",)),
    ("data", ("mace_mf.data",)),
    ("evaluation", ("mace_mf.evaluation",)),
    ("train", ("mace_mf.train",)),
    ("workflows", ("mace_mf.workflows",)),
    ("interface", ("mace_mf.cli", "mace_mf")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The index of the layer holding ``module`` (the most specific prefix wins)."""
    best, length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    assert best is not None, f"{module} is in no layer; add it to LAYERS and to the README's module map"
    return best


def imports_of(path: Path) -> set[str]:
    """Every mace_mf module ``path`` imports, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mace_mf")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mace_mf"):
            for alias in node.names:  # `from mace_mf.train import trainer` imports a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
    return found


def _is_module(name: str) -> bool:
    base = ROOT / Path(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_points_down_or_within_its_layer():
    upward = [
        f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for source, targets in GRAPH.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(source)
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_modules_import_each_other_in_no_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target == module or target not in GRAPH:
                continue
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in GRAPH:
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_layer_test_sees_an_upward_import():
    """The check itself can fail: a model module importing the trainer is caught."""
    assert layer_of("mace_mf.train.trainer") > layer_of("mace_mf.model.heads")
    assert "mace_mf.model.forward" in GRAPH["mace_mf.train.trainer"]
    assert "mace_mf.train.trainer" in imports_of(ROOT / "mace_mf" / "workflows" / "run.py")


LIGHT = ["mace_mf", "mace_mf.cli", "mace_mf.config.loading", "mace_mf.labels.calculators", "mace_mf.labels.labelling"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_do_not_load_torch(module):
    """`mace-mf --help`, `recipe check` and labelling workers start without torch (seconds saved)."""
    code = f"import sys, {module}; print('torch' in sys.modules, 'mace' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.split() == ["False", "False"], f"importing {module} loads torch or mace"
