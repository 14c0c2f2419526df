"""The package's folders draw DESIGN.md's layers: read from every import statement (those inside functions
included), a module imports only its own layer and the layers below it, no import cycle exists, nothing
imports the CLI, and the pure layers import nothing that acts on the system."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "istio_iptables"
DESIGN = ROOT.parent / "shared" / "DESIGN.md"

LAYERS = ["cli", "cni", "kube", "explain", "apply", "backends", "host", "state", "render", "capture", "leaves"]
"""Highest first, as DESIGN.md lists them."""
LEAVES = {"errors", "records", "log", "logformat"}
"""The leaves every layer may use: errors, records, and the log writer (its line format and its handlers for the
logging module)."""
PURE = {"capture", "render", "state"}
SIDE_EFFECTS = {"subprocess", "socket", "fcntl", "ctypes", "signal", "pyroute2", "iptc", "shutil", "tempfile"}
"""Modules whose import means acting on the system; the pure layers never need one."""
ENTRY_POINTS = {"istio_iptables.__main__"}
"""``python -m istio_iptables``: the one module outside the CLI that may start it."""


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = modules()


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "leaves"
    first = parts[1]
    if first in LEAVES or first in ("__init__", "__main__"):
        return "leaves" if first in LEAVES else "entry"
    return first


def imports(module: str) -> Iterator[tuple[str, int]]:
    """The package modules ``module`` imports (``from pkg import submodule`` resolved to the submodule), and
    external top-level names, each with its line."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                yield (candidate if candidate in MODULES else source), node.lineno


def internal_edges() -> dict[str, set[str]]:
    return {
        module: {target for target, _ in imports(module) if target in MODULES and target != module}
        for module in MODULES
    }


def test_every_module_is_in_a_layer_of_design() -> None:
    known = set(LAYERS) | {"entry"}
    strays = sorted(module for module in MODULES if layer(module) not in known)
    assert not strays, f"modules outside DESIGN.md's layers: {strays}"


def test_design_lists_the_same_layers_in_the_same_order() -> None:
    if not DESIGN.exists():
        pytest.skip("../shared/DESIGN.md is not beside the repository")
    block = DESIGN.read_text().split("## Layers", 1)[1].split("```", 2)[1]
    listed = [m.group(1) for m in re.finditer(r"^  (\w+)(?:/|\.py) ", block, re.MULTILINE) if m.group(1) != "errors"]
    assert [*listed, "leaves"] == LAYERS
    assert all(leaf in block for leaf in ("errors.py", "records.py", "the log writer"))


def test_each_layer_imports_only_itself_and_the_layers_below() -> None:
    rank = {name: index for index, name in enumerate(LAYERS)}
    upward = []
    for module in MODULES:
        if module in ENTRY_POINTS:
            continue
        for target, line in imports(module):
            if target in MODULES and rank[layer(target)] < rank[layer(module)]:
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "\n".join(upward)


def test_nothing_outside_the_cli_imports_it() -> None:
    importers = [
        f"{MODULES[module].relative_to(ROOT)}:{line}"
        for module in MODULES
        if layer(module) != "cli" and module not in ENTRY_POINTS
        for target, line in imports(module)
        if target == "istio_iptables.cli" or target.startswith("istio_iptables.cli.")
    ]
    assert not importers, importers


def test_no_import_cycle() -> None:
    edges = internal_edges()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            # A package's __init__ is imported before any of its submodules: not an edge back.
            if state.get(target) == 1 and not module.startswith(target + "."):
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_pure_layers_import_nothing_that_acts_on_the_system() -> None:
    found = [
        f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}"
        for module in MODULES
        if layer(module) in PURE
        for target, line in imports(module)
        if target.split(".")[0] in SIDE_EFFECTS
    ]
    assert not found, found


def test_the_checks_see_a_violation() -> None:
    """The import reader finds lazy imports inside functions, the kind a cycle hides in."""
    lazy = {target for target, _ in imports("istio_iptables.cli.fast")}
    assert "istio_iptables.cli.app" in lazy
    assert layer("istio_iptables.host.netns") == "host" and layer("istio_iptables.log") == "leaves"
