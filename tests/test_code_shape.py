"""The codebase stays readable: no source file over 450 lines, no class over 250, no
function over 60, in the engine, the built-in plugins and the package (issues 11 and 20)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(path for folder in ("engine", "plugins", "package") for path in (ROOT / folder).rglob("*.py"))
MAX_FILE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 450, 250, 60


def test_the_sources_are_found():
    assert len(SOURCES) > 40


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_file_and_class_sizes(path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path.relative_to(ROOT)}: split it by concern"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_CLASS_LINES, f"{path.relative_to(ROOT)}: class {node.name} has {length} lines"


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function over ``limit`` lines, decorators excluded; a
    method is ``Class.method``, a nested function counts on its own (its lines stay in
    the outer one too, as they are read there)."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1
                if length > limit:
                    found.append((name, length))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_no_function_is_over_60_lines():
    offenders = [f"{path.relative_to(ROOT)}: {name} has {length} lines"
                 for path in SOURCES for name, length in long_functions(path.read_text(encoding="utf-8"))]
    assert not offenders, f"split these functions (at most {MAX_FUNCTION_LINES} lines each):\n" + "\n".join(offenders)


def test_the_function_check_sees_methods_nested_and_async_functions():
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    source = (f"class A:\n    def method(self):\n{body.replace('    ', '        ')}\n"
              f"async def outer():\n    def inner():\n{body.replace('    ', '        ')}\n"
              f"def short():\n{body[:-9]}\n")
    found = dict(long_functions(source))
    assert found == {"A.method": 61, "outer": 62, "outer.inner": 61}
