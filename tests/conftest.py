"""Shared test helpers: run the CLI in-process, write recipes, tiny configs."""

from __future__ import annotations

import contextlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from pyramidkd.engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

# A whole experiment that trains in about a second on 2 cores.
TINY_RECIPE = """
[experiment]
name = "tiny"
seed = 3
device = "cpu"

[dataset]
name = "synthetic"
num_classes = 4
image_size = 8
train_size = 96
val_size = 32
test_size = 32

[train]
epochs = 2
batch_size = 32
optimizer = { name = "sgd", lr = 0.05 }

[[stages]]
id = "teacher"
scheme = "scratch"
model = { name = "vgg", layers = [8, "M", 16, "M"] }

[[stages]]
id = "student"
scheme = { name = "kd", teacher = "teacher" }
model = { name = "vgg", layers = [4, "M"] }
loss = { name = "kd", temperature = 2.0, alpha = 0.7 }
"""


@attrs.define
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Call ``pyramidkd ARGS...`` in-process; returns exit code, stdout, stderr."""

    def call(*args: str) -> CliResult:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse usage errors and --version
            code = exit_.code
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return call


@pytest.fixture
def write_recipe(tmp_path):
    """Write recipe text (dedented) to a file in tmp_path and return its path."""

    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@contextlib.contextmanager
def recipe_with_plugin(folder: Path, module: str, plugin_source: str, recipe_text: str | None = None) -> Iterator[Path]:
    """Write a test plugin ``<module>.py`` (and, given, ``recipe.toml``) into ``folder``;
    yield the recipe's path (the folder without one), then forget the imported module so
    that the next test's copy is the one loaded."""
    (folder / f"{module}.py").write_text(plugin_source)
    path = folder
    if recipe_text is not None:
        path = folder / "recipe.toml"
        path.write_text(recipe_text)
    try:
        yield path
    finally:
        sys.modules.pop(module, None)
