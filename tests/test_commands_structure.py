"""The commands stay apart from the runtime: one module per command under
engine/commands/, the runtime never imports them, one formatting module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pyramidkd.engine import formatting

ENGINE = Path(__file__).resolve().parents[1] / "engine"
COMMANDS = ENGINE / "commands"
ENTRY_POINT = ENGINE / "cli.py"


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in an engine module (``source``:
    its text, default read from ``path``), relative imports resolved against
    ``pyramidkd.engine``."""
    package = ["pyramidkd", "engine", *path.parent.relative_to(ENGINE).parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from . import commands` / `from .. import commands` imports the package too
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def runtime_modules() -> list[Path]:
    return sorted(p for p in ENGINE.rglob("*.py") if COMMANDS not in p.parents and p != ENTRY_POINT)


def test_the_runtime_never_imports_the_commands():
    modules = runtime_modules()
    assert ENGINE / "runner.py" in modules and ENGINE / "formatting.py" in modules
    offenders = [
        f"{path.relative_to(ENGINE.parent)}:{line} imports {name}"
        for path in modules
        for line, name in imported_modules(path)
        if name == "pyramidkd.engine.commands" or name.startswith("pyramidkd.engine.commands.")
    ]
    assert not offenders, "the runtime imports the command-line commands:\n" + "\n".join(offenders)


def test_the_import_check_sees_relative_and_absolute_imports():
    """The check above can fail: it resolves every spelling of the import."""
    source = "from ..commands import report\nfrom .. import commands\nimport pyramidkd.engine.commands.run\n"
    names = [name for _, name in imported_modules(ENGINE / "training" / "example.py", source)]
    assert "pyramidkd.engine.commands" in names and "pyramidkd.engine.commands.report" in names
    assert "pyramidkd.engine.commands.run" in names
    assert "pyramidkd.engine.formatting" in [name for _, name in imported_modules(ENGINE / "x.py", "from .formatting import percent")]


SUPPORT_MODULES = {"__init__", "registry", "builtin", "arguments"}  # the wiring every command shares


def test_one_module_per_command_and_each_a_thin_adapter():
    """A command module holds its arguments and an ``execute`` that calls the library
    and prints; anything else it defined would be logic the library should own."""
    from pyramidkd.engine.commands import builtin

    expected = {"run", "sweep", "search", "validate", "models", "bench-models", "plugins", "report", "save-weights", "convert-checkpoint", "export", "bench-deploy"}
    assert {module.NAME for module in builtin.BUILTIN_COMMANDS} == expected
    assert {Path(module.__file__).stem for module in builtin.BUILTIN_COMMANDS} == {n.replace("-", "_") for n in expected}
    assert {path.stem for path in COMMANDS.glob("*.py")} == {n.replace("-", "_") for n in expected} | SUPPORT_MODULES
    for module in builtin.BUILTIN_COMMANDS:
        defined = {name for name, value in vars(module).items()
                   if callable(value) and getattr(value, "__module__", None) == module.__name__ and not name.startswith("_")}
        assert defined == {"add_arguments", "execute"}, f"{module.__name__} defines {sorted(defined)}: move the work to the library"


def test_debug_is_declared_once_and_shared_by_every_command():
    import argparse

    from pyramidkd.engine.commands import build_parser, builtin_commands

    parser = build_parser(builtin_commands())
    (declared,) = [action for action in parser._actions if "--debug" in action.option_strings]
    (subparsers,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert len(subparsers.choices) == 12
    for name, sub in subparsers.choices.items():
        assert [a for a in sub._actions if "--debug" in a.option_strings] == [declared], name  # the one declaration
    assert parser.parse_args(["--debug", "plugins"]).debug and parser.parse_args(["plugins", "--debug"]).debug
    assert not getattr(parser.parse_args(["plugins"]), "debug", False)


@pytest.mark.parametrize("value, text", [(None, "-"), (0, "0"), (772, "772"), (292_586, "292.6k"), (3_960_000, "3.96M"),
                                         (1_200_000_000, "1.20G")])
def test_one_count_format_everywhere(value, text):
    assert formatting.format_count(value) == text


def test_percent_and_number_formats():
    assert formatting.format_percent(0.97034) == "97.03" and formatting.format_percent(None) == "-"
    assert formatting.percent(0.5) == 50.0 and formatting.percent(None) is None
    assert formatting.format_number(1.254, signed=True) == "+1.25" and formatting.format_number(None) == "-"


def test_table_formats_align_columns():
    rows = [{"name": "vgg19", "params": "20.04M"}, {"name": "svgg5", "params": "772"}]
    assert formatting.format_table(rows, right={"params"}).splitlines() == [
        "name   params",
        "-----  ------",
        "vgg19  20.04M",
        "svgg5     772",
    ]
    assert formatting.format_markdown_table(rows, right={"params"}).splitlines() == [
        "| name | params |",
        "| --- | ---: |",
        "| vgg19 | 20.04M |",
        "| svgg5 | 772 |",
    ]
    assert formatting.format_table([]) == "(no rows)"
