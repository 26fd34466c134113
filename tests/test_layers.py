"""The package's layers: every import in qfm/ runs downward, and no modules import each other.

The order is written once, in docs/architecture.md ("## Layers"), and read from there. Every ``import`` and
``from ... import`` statement counts, at module level or inside a function, under ``if TYPE_CHECKING`` or
not, absolute or relative. ``from a.b import c`` is an import of the module ``a.b.c`` when that module exists,
else of ``a.b``; importing a module is not counted as importing the packages above it (Python runs their
``__init__`` first, but a package that imports its own submodules is not a cycle).
"""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "qfm"
DOC = ROOT / "docs" / "architecture.md"
SECTION = "## Layers"


@dataclass(frozen=True)
class Layer:
    number: int
    what: str
    paths: tuple[str, ...]  # 'qfm/cli.py' (one module) or 'qfm/steps/' (a package and everything below it)

    def __str__(self) -> str:
        return f"layer {self.number} ({self.what})"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module imported
    line: int
    statement: str

    def __str__(self) -> str:
        return f"{self.module} line {self.line}: `{self.statement}`"


def read_layers(text: str) -> list[Layer]:
    """The table under '## Layers', top layer first: rows '| number | what | `path`, `path` |'."""
    if SECTION not in text:
        raise AssertionError(f"{DOC.name} has no '{SECTION}' section: write the layer table there")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            layers.append(Layer(int(cells[0]), cells[1], tuple(re.findall(r"`([^`]+)`", cells[2]))))
    numbers = [layer.number for layer in layers]
    if not layers or numbers != list(range(1, len(layers) + 1)):
        raise AssertionError(f"{DOC.name} '{SECTION}': expected table rows numbered 1, 2, ... from the top, "
                             f"found {numbers}")
    return layers


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__.py), paths relative to root."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root)
        parts = rel.with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = rel
    return out


def layer_of(name: str, modules: dict[str, Path], layers: list[Layer]) -> Layer | None:
    """The layer of a dotted module name (the longest matching path of the table), or None."""
    path = modules[name].as_posix() if name in modules else name.replace(".", "/") + "/"
    best: tuple[int, Layer] | None = None
    for layer in layers:
        for entry in layer.paths:
            if (path == entry or (entry.endswith("/") and path.startswith(entry))) and \
                    (best is None or len(entry) > best[0]):
                best = (len(entry), layer)
    return best[1] if best else None


def _resolve(base: str, name: str, modules: dict[str, Path]) -> str:
    """The module that `from base import name` loads: base.name when that is a module, else base (in the
    package, the longest existing module above a name that is none)."""
    if f"{base}.{name}" in modules:
        return f"{base}.{name}"
    while base not in modules and base.startswith(f"{PACKAGE}."):
        base = base.rsplit(".", 1)[0]
    return base


def imports_of(name: str, source: str, modules: dict[str, Path], is_package: bool = False) -> list[Import]:
    """Every import of a first-party module (qfm, components, pipelines) in this module's source."""
    tree = ast.parse(source)
    here = name if is_package else name.rpartition(".")[0]
    first_party = (PACKAGE, "components", "pipelines")
    out = []
    for node in ast.walk(tree):
        statement = ast.unparse(node) if isinstance(node, (ast.Import, ast.ImportFrom)) else ""
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")
                if node.level - 1 >= len(parts):
                    raise AssertionError(f"{name} line {node.lineno}: `{statement}` goes above the package")
                base = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [_resolve(base, alias.name, modules) for alias in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target.split(".", 1)[0] in first_party and target != name:
                out.append(Import(name, target, node.lineno, statement))
    return out


def upward_imports(imports: list[Import], modules: dict[str, Path], layers: list[Layer]) -> list[str]:
    """One line per import from a layer above the importing module's."""
    out = []
    for imp in imports:
        own, theirs = layer_of(imp.module, modules, layers), layer_of(imp.target, modules, layers)
        if own and theirs and theirs.number < own.number:
            out.append(f"{imp} imports {imp.target}, {theirs}, from {imp.module}, {own} below it")
    return out


def import_cycles(imports: list[Import]) -> list[str]:
    """One line per cycle among the modules (each strongly connected group once, as one loop through it)."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        edges.setdefault(imp.module, {}).setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    out = []
    for group in groups:
        loop = _loop(group[0], set(group), edges)
        steps = "; ".join(str(edges[a][b]) for a, b in itertools.pairwise(loop))
        out.append(f"{' -> '.join(loop)}: {steps}")
    return out


def _loop(start: str, group: set[str], edges: dict[str, dict[str, Import]]) -> list[str]:
    """A shortest path from start back to start inside its strongly connected group."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in edges.get(node, {}):
                if nxt == start:
                    return paths[node] + [start]
                if nxt in group and nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in no loop")


def package_imports(modules: dict[str, Path]) -> list[Import]:
    return [imp for name, path in modules.items()
            for imp in imports_of(name, (ROOT / path).read_text(), modules, path.name == "__init__.py")]


@pytest.fixture(scope="module")
def layers() -> list[Layer]:
    return read_layers(DOC.read_text())


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return package_modules()


def test_every_module_has_one_layer(layers, modules):
    missing = [str(path) for name, path in modules.items() if layer_of(name, modules, layers) is None]
    assert not missing, (f"modules in no layer: {', '.join(missing)}; add each to the '{SECTION}' table of "
                         f"docs/architecture.md")
    entries = [entry for layer in layers for entry in layer.paths]
    stale = [entry for entry in entries if not (ROOT / entry).exists()]
    assert not stale, f"docs/architecture.md '{SECTION}' names paths that do not exist: {', '.join(stale)}"
    twice = sorted({entry for entry in entries if entries.count(entry) > 1})
    assert not twice, f"docs/architecture.md '{SECTION}' puts these in more than one layer: {', '.join(twice)}"


def test_no_import_points_up(layers, modules):
    upward = upward_imports(package_imports(modules), modules, layers)
    assert not upward, ("imports from a layer above (move the imported piece down to the layer that uses it, "
                        "or the importing code up):\n" + "\n".join(upward))


def test_no_import_cycles(modules):
    cycles = import_cycles(package_imports(modules))
    assert not cycles, "modules that import each other (move the shared piece into one of them, or below both):\n" \
        + "\n".join(cycles)


# The checker itself, on made-up sources: each kind of import it must see, and each it must let pass.
SAMPLE_LAYERS = read_layers(f"{SECTION}\n\n| layer | what | modules |\n| --- | --- | --- |\n"
                            "| 1 | commands | `qfm/cli.py`, `components/` |\n| 2 | steps | `qfm/steps/` |\n"
                            "| 3 | serving | `qfm/registry/`, `qfm/export.py` |\n| 4 | base | `qfm/errors.py` |\n")
SAMPLE_MODULES = {name: Path(path) for name, path in {
    "qfm.cli": "qfm/cli.py", "qfm.steps": "qfm/steps/__init__.py", "qfm.steps.score": "qfm/steps/score.py",
    "qfm.steps.common": "qfm/steps/common.py", "qfm.registry": "qfm/registry/__init__.py",
    "qfm.registry.pyfunc": "qfm/registry/pyfunc.py", "qfm.export": "qfm/export.py", "qfm.errors": "qfm/errors.py",
}.items()}


def _sample_upward(name: str, source: str) -> list[str]:
    imports = imports_of(name, source, SAMPLE_MODULES, SAMPLE_MODULES[name].name == "__init__.py")
    return upward_imports(imports, SAMPLE_MODULES, SAMPLE_LAYERS)


@pytest.mark.parametrize("source", [
    "from qfm.steps.score import load_engine_model",
    "import qfm.steps.score",
    "from qfm.steps import score",
    "def load():\n    from ..steps.score import load_engine_model\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qfm.steps import score\n",
])
def test_checker_sees_an_upward_import_in_any_form(source):
    (found,) = _sample_upward("qfm.registry.pyfunc", source)
    assert found.startswith("qfm.registry.pyfunc line ")
    assert "imports qfm.steps.score, layer 2 (steps), from qfm.registry.pyfunc, layer 3 (serving)" in found


def test_checker_resolves_relative_imports_from_a_package_and_a_name():
    assert _sample_upward("qfm.registry", "from ..steps import common") == [
        ("qfm.registry line 1: `from ..steps import common` imports qfm.steps.common, layer 2 (steps), from "
         "qfm.registry, layer 3 (serving) below it")]
    (found,) = _sample_upward("qfm.export", "from .steps.common import model_path")
    assert "imports qfm.steps.common, layer 2 (steps)" in found
    (found,) = _sample_upward("qfm.steps.score", "from components.base import run")  # above the package
    assert "imports components.base, layer 1 (commands)" in found


def test_checker_lets_downward_and_same_layer_imports_and_other_libraries_pass():
    assert _sample_upward("qfm.registry.pyfunc", "from qfm.export import ONNX_FILE\nfrom qfm.errors import "
                          "QfmError\nfrom . import pyfunc\nimport pandas\nfrom qfmx import thing") == []
    assert _sample_upward("qfm.cli", "from qfm.steps.score import score_images") == []


def test_checker_names_both_imports_of_a_cycle_and_a_longer_loop():
    two = [Import("qfm.a", "qfm.b", 3, "from qfm.b import x"), Import("qfm.b", "qfm.a", 9, "from qfm.a import y")]
    assert import_cycles(two) == [("qfm.a -> qfm.b -> qfm.a: qfm.a line 3: `from qfm.b import x`; "
                                   "qfm.b line 9: `from qfm.a import y`")]
    three = [Import("qfm.a", "qfm.b", 1, "import qfm.b"), Import("qfm.b", "qfm.c", 1, "import qfm.c"),
             Import("qfm.c", "qfm.a", 1, "import qfm.a"), Import("qfm.c", "qfm.d", 1, "import qfm.d")]
    (loop,) = import_cycles(three)
    assert loop.startswith("qfm.a -> qfm.b -> qfm.c -> qfm.a: ")
    assert import_cycles(three[:2] + three[3:]) == []


def test_checker_reads_the_table_and_refuses_a_missing_or_misnumbered_one():
    assert [(layer.number, layer.paths) for layer in SAMPLE_LAYERS][:2] == [
        (1, ("qfm/cli.py", "components/")), (2, ("qfm/steps/",))]
    assert layer_of("qfm.steps.score", SAMPLE_MODULES, SAMPLE_LAYERS).number == 2
    assert layer_of("components.base", SAMPLE_MODULES, SAMPLE_LAYERS).number == 1
    with pytest.raises(AssertionError, match="no '## Layers' section"):
        read_layers("# Architecture\n")
    with pytest.raises(AssertionError, match=r"found \[1, 3\]"):
        read_layers(f"{SECTION}\n| 1 | a | `qfm/cli.py` |\n| 3 | b | `qfm/errors.py` |\n")
