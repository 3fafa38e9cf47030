"""The package's shape, checked: no import cycle inside ``imgstore`` (imports inside functions
and under ``TYPE_CHECKING`` count: a cycle hidden in a function is still one), the library
imports neither click nor FastAPI, and the web layer talks to the store only through
``ImageStore`` (no models, no SQLAlchemy, no ``.ctx``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "imgstore"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imported(module: str, path: Path) -> set[str]:
    """Every module of ours that ``module`` imports, anywhere in its body. ``from . import x``
    names the submodule x; a name imported from a package names the package."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in MODULES else origin for a in node.names]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {module: _imported(module, path) for module, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    source = "def f():\n    from .search import x\n"
    tree_names = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert tree_names == {"search"}  # ast.walk reaches imports inside functions


def test_no_import_cycles_inside_the_package() -> None:
    assert GRAPH.get("imgstore.search"), "the import graph was not read"
    cycles = _cycles(GRAPH)
    assert cycles == [], "import cycles (a concept in the wrong module): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_value_types_import_nothing_of_ours() -> None:
    assert GRAPH["imgstore.types"] == set()


WEB = [m for m in MODULES if m == "imgstore.serve" or m.startswith("imgstore.web")]


@pytest.mark.parametrize("module", WEB)
def test_the_web_layer_uses_only_the_public_api(module: str) -> None:
    assert "imgstore.models" not in GRAPH[module] and "imgstore.context" not in GRAPH[module]
    source = MODULES[module].read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert "sqlalchemy" not in imported
    reaches_ctx = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "ctx"]
    assert reaches_ctx == [], f"{module} reaches into the store's context at lines {reaches_ctx}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in WEB and m != "imgstore.cli"))
def test_the_library_imports_neither_click_nor_fastapi(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert not roots & {"click", "fastapi", "starlette", "uvicorn"}


def test_nothing_imports_the_cli() -> None:
    assert [m for m, deps in GRAPH.items() if "imgstore.cli" in deps] == []
