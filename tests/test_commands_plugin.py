"""Commands are plugins: `pyramidkd_register_commands` adds a sub-command, the
built-ins come through the same hook, and errors name the plugin."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pyramidkd import testing
from pyramidkd.engine import UserError
from pyramidkd.engine.cli import main
from test_host import write_fake_distribution

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def hello_plugin(name: str = "hello_commands", command: str = "hello", run=None) -> types.ModuleType:
    def add_arguments(parser):
        parser.add_argument("who")
        parser.add_argument("--times", type=int, default=1)

    def hello(args):
        for _ in range(args.times):
            print(f"hello {args.who}")
        return 3 if args.who == "three" else 0

    def register(commands):
        commands.add(command, help="say hello", arguments=add_arguments, run=run or hello)

    return testing.plugin_module(name, pyramidkd_register_commands=register)


def call(capsys, *args, plugins=()):
    try:
        code = main([str(a) for a in args], extra_plugins=plugins)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_plugin_adds_a_command_that_runs(capsys):
    plugin = hello_plugin()
    code, out, _ = call(capsys, "hello", "world", "--times", "2", plugins=[plugin])
    assert code == 0 and out == "hello world\nhello world\n"
    assert call(capsys, "hello", "three", plugins=[plugin])[0] == 3  # its exit code is the command's
    code, out, _ = call(capsys, "--help", plugins=[plugin])
    assert code == 0 and re.search(r"hello\s+say hello", out)
    assert out.index("run ") < out.index("report ") < out.index("hello ")  # built-ins first, in their order
    code, _, err = call(capsys, "hello", plugins=[plugin])  # its own arguments are parsed by argparse
    assert code == 2 and "the following arguments are required: who" in err
    assert call(capsys, "hello", "x")[0] == 2  # without the plugin there is no such command


def test_debug_works_before_and_after_a_plugin_command(capsys):
    def fail(args):
        raise ValueError("no greeting today")

    plugin = hello_plugin(run=fail)
    for args in (("hello", "x"), ("--debug", "hello", "x"), ("hello", "x", "--debug")):
        code, _, err = call(capsys, *args, plugins=[plugin])
        assert code == 1
        assert "error: command 'hello' from plugin 'hello_commands' raised ValueError: no greeting today" in err
        assert ("Traceback" in err) == ("--debug" in args)


def test_a_user_error_from_a_plugin_command_is_a_clear_message(capsys):
    def refuse(args):
        raise UserError("nothing to greet", file=args.who, fix="pass a name")

    code, _, err = call(capsys, "hello", "nobody.txt", plugins=[hello_plugin(run=refuse)])
    assert code == 1 and err == "error: nobody.txt: nothing to greet\n  fix: pass a name\n"


def test_command_names_are_checked_and_unique(capsys):
    code, _, err = call(capsys, "--version", plugins=[hello_plugin(command="report")])
    assert "two plugins provide a command named 'report'" in err
    assert "pyramidkd.engine.commands.builtin" in err and "hello_commands" in err
    assert code == 0  # the built-in commands still work, with a warning naming the problem
    _, _, err = call(capsys, "--version", plugins=[hello_plugin(command="Say Hello")])
    assert "invalid name 'Say Hello'" in err and "lowercase" in err


def test_plugins_lists_the_commands_each_plugin_adds(cli):
    rows = {row["name"]: row for row in json.loads(cli("plugins", "--json").out)}
    builtin = rows["pyramidkd.engine.commands.builtin"]
    assert builtin["source"] == "builtin"
    assert builtin["components"] == {"command": ["run", "sweep", "search", "validate", "models", "bench-models", "plugins", "report",
                                                      "save-weights", "convert-checkpoint", "export", "bench-deploy"]}
    assert "pyramidkd_register_commands" in builtin["hooks"]


def test_an_installed_package_adds_a_command(tmp_path):
    """End to end: a distribution's entry point adds `pyramidkd greet`, run as a new process."""
    write_fake_distribution(
        tmp_path,
        "from pyramidkd.engine import hookimpl\n\n"
        "def greet(args):\n    print(f'greetings, {args.name}')\n    return 0\n\n"
        "@hookimpl\ndef pyramidkd_register_commands(commands):\n"
        "    commands.add('greet', help='greet someone', arguments=lambda p: p.add_argument('name'), run=greet)\n",
        module="greet_plugin", dist="greet-plugin", version="0.1",
    )
    env = {k: v for k, v in os.environ.items() if k != "PYRAMIDKD_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "pyramidkd", "greet", "Ada"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "greetings, Ada\n"


def test_the_documented_command_example_runs(tmp_path, capsys):
    block = next(b for b in re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL) if "pyramidkd_register_commands" in b)
    module = types.ModuleType("docs_best_command")
    exec(compile(block, "<docs/plugins.md>", "exec"), module.__dict__)
    summary = testing.run_tiny(testing.TINY_RECIPE, workdir=tmp_path)
    best = max(summary["stages"], key=lambda s: s["test_acc"])
    code, out, _ = call(capsys, "best", tmp_path / "run", plugins=[module])
    assert code == 0 and out.startswith(f"{best['stage']}: {100 * best['test_acc']:.2f}% test, ")
    code, _, err = call(capsys, "best", tmp_path, plugins=[module])
    assert code == 1 and "no summary.json" in err and "fix:" in err


@pytest.mark.parametrize("bad", ["not callable", None])
def test_a_command_needs_a_run_function(capsys, bad):
    plugin = testing.plugin_module("no_run", pyramidkd_register_commands=lambda commands: commands.add("x", help="x", run=bad))
    _, _, err = call(capsys, "--version", plugins=[plugin])
    assert "plugin 'no_run', command 'x'" in err
