"""The codebase stays readable: no source file over 450 lines, no class over 250, in
the engine, the built-in plugins and the package (issue 11's targets)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(path for folder in ("engine", "plugins", "package") for path in (ROOT / folder).rglob("*.py"))
MAX_FILE_LINES, MAX_CLASS_LINES = 450, 250


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
