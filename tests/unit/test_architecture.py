"""The package's layers (docs/architecture.md): every module imports only from its own layer or
the layers below it, and the import graph has no cycle. Function-local imports count too; a
``TYPE_CHECKING`` import (types only, never run) may point anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "irm_lens"

# Bottom first. Keep in step with docs/architecture.md.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "data"),
    ("_io", "_packages", "_progress", "chat", "hooks", "losses", "scoring"),
    ("attention", "components", "models"),
    ("data.corpora", "data.personas", "data.dataset", "data.precomputed"),
    ("irm",),
    ("inject",),
    ("steering",),
    ("generation",),
    ("data.synthetic", "objectives", "evaluate", "distributed"),
    ("train", "pairs", "compare"),
    ("sweeps", "recipes"),
    ("analysis.indices", "analysis.stats", "analysis.provenance", "analysis.conditions"),
    ("analysis.norms", "analysis.magnitudes", "analysis.outputs", "analysis.attribution",
     "analysis.patching", "analysis.ablation", "analysis.dynamics",
     "analysis.normscale", "organism"),
    ("analysis.prediction", "analysis.dossier", "analysis"),
    ("report.figures", "report.summary", "report.html", "report"),
    ("investigate",),
    ("cli", "__main__"),
    ("",),  # the package itself: the public API re-exported
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path) -> set[str]:
    return _imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


def _imports_of(source: str, name: str, is_package: bool) -> set[str]:
    """The irm_lens modules the module ``name`` imports (names relative to the package),
    outside TYPE_CHECKING blocks."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "irm_lens")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                module = ".".join(["irm_lens", *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module.split(".")[0] == "irm_lens":
                for alias in node.names:  # `from irm_lens.data import dataset` names a module
                    sub = f"{module}.{alias.name}"
                    found.add(sub if sub[len("irm_lens."):] in RANK else module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return {m[len("irm_lens."):] if m != "irm_lens" else "" for m in found}


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    assert sorted(set(GRAPH) - set(RANK)) == []
    assert sorted(set(RANK) - set(GRAPH)) == []


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    upward = sorted(m for m in GRAPH[module] if RANK[m] > RANK[module])
    assert upward == [], f"{module} (layer {RANK[module]}) imports from layers above it: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in GRAPH[module]:
            if state.get(other) == 1:
                raise AssertionError(" -> ".join([*path, module, other]))
            if other not in state:
                visit(other, [*path, module])
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [])


def test_the_checker_sees_local_relative_and_module_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .errors import ConfigError\n"
        "from ..irm import IRM\n"
        "from irm_lens.data import dataset\n"
        "if TYPE_CHECKING:\n    from irm_lens.cli import main\n"
        "def f():\n    import irm_lens.investigate\n    from irm_lens import report\n"
    )
    found = _imports_of(source, "analysis.norms", is_package=False)
    assert found == {"analysis.errors", "irm", "data.dataset", "investigate", "report"}
    assert _imports_of("import irm_lens\n", "steering", is_package=False) == {""}
