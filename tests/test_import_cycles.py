"""No import cycles anywhere in the package: the import graph of every pyramidkd
module (engine/, plugins/, package/), function-local imports included, has no
strongly connected component of more than one module.

A cycle works only while every module in it happens to import the others late
enough; it also means the modules cannot be understood, tested or moved apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"engine": "pyramidkd.engine", "plugins": "pyramidkd.plugins", "package": "pyramidkd"}


def module_name(path: Path) -> tuple[str, bool]:
    """The dotted name ``path`` installs as, and whether it is a package's ``__init__``."""
    relative = path.relative_to(ROOT)
    parts = [PACKAGES[relative.parts[0]], *relative.parts[1:-1]]
    is_package = path.name == "__init__.py"
    if not is_package:
        parts.append(path.stem)
    return ".".join(part for part in parts if part), is_package


def source_modules() -> dict[str, Path]:
    modules = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            modules[module_name(path)[0]] = path
    return modules


def imports_of(name: str, is_package: bool, source: str, known: set[str]) -> set[str]:
    """The pyramidkd modules that ``source`` (module ``name``) imports, at any depth
    of the file. ``from P import x`` imports the submodule ``P.x`` where there is one,
    else the package ``P`` itself (its ``__init__``)."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {module for module in found if module in known and module != name}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    known = set(modules)
    return {name: imports_of(name, path.name == "__init__.py", path.read_text(encoding="utf-8"), known)
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"    {a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "  " + ", ".join(component) + "\n" + "\n".join(edges)


def test_no_import_cycles_in_the_package():
    modules = source_modules()
    assert "pyramidkd.engine.runner" in modules and "pyramidkd.plugins.losses.distillation" in modules
    assert "pyramidkd.testing" in modules and "pyramidkd" in modules
    graph = import_graph(modules)
    found = cycles(graph)
    assert not found, "import cycles (break each one):\n" + "\n".join(describe(c, graph) for c in found)


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "a"}}) == [["a", "b"], ["c", "d"]]


def test_every_spelling_of_an_import_is_an_edge():
    known = {"pyramidkd.engine", "pyramidkd.engine.errors", "pyramidkd.engine.commands", "pyramidkd.engine.commands.run",
             "pyramidkd.engine.commands.report", "pyramidkd.plugins.models.vgg", "pyramidkd"}
    source = ("from .. import errors, hookimpl\n"  # a submodule, and a name from the package's __init__
              "from . import run\n"
              "import pyramidkd.plugins.models.vgg\n"
              "def late():\n    from ..errors import UserError\n    from pyramidkd import __version__\n")
    assert imports_of("pyramidkd.engine.commands.report", False, source, known) == {
        "pyramidkd.engine.errors", "pyramidkd.engine", "pyramidkd.engine.commands.run", "pyramidkd.plugins.models.vgg",
        "pyramidkd"}
    # in a package's __init__, `from . import x` is relative to the package itself
    assert imports_of("pyramidkd.engine.commands", True, "from .run import x\n", known) == {"pyramidkd.engine.commands.run"}
