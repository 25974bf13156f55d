"""Commands as plugins provide them, and the argparse parser built from them.

A plugin adds a command from its ``pyramidkd_register_commands(commands)`` hook
implementation (as datasette's ``publish_subcommand``)::

    commands.add("hello", help="say hello", arguments=add_arguments, run=hello)

The built-in commands come through the same hook (:mod:`.builtin`).
"""

from __future__ import annotations

import argparse
import re
from typing import Callable, Iterator

import attrs

from ..errors import PluginError

BUILTIN_PLUGIN = "pyramidkd.engine.commands.builtin"
HOOK = "pyramidkd_register_commands"
NAME_PATTERN = re.compile(r"[a-z][a-z0-9-]*\Z")

Runner = Callable[[argparse.Namespace], "int | None"]
ArgumentAdder = Callable[[argparse.ArgumentParser], None]


@attrs.frozen
class Command:
    """One sub-command: ``pyramidkd NAME ...``."""

    name: str
    help: str
    run: Runner  # returns the exit code (None counts as 0)
    arguments: ArgumentAdder | None = None  # adds the command's options to its parser
    description: str | None = None  # the text of `pyramidkd NAME --help` (default: help)
    plugin: str = BUILTIN_PLUGIN


class Commands:
    """What ``pyramidkd_register_commands`` receives: ``add`` one sub-command per call."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self._plugin = BUILTIN_PLUGIN  # the plugin whose hook is being called

    def add(self, name: str, *, help: str, run: Runner, arguments: ArgumentAdder | None = None,
            description: str | None = None) -> None:
        """Add ``pyramidkd NAME``: ``arguments(parser)`` adds its options to an
        ``argparse.ArgumentParser``; ``run(args)`` does the work and returns the exit code."""
        plugin = self._plugin
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise PluginError(f"plugin {plugin!r} added a command with an invalid name {name!r}",
                              fix="name it with lowercase letters, digits and '-', starting with a letter (e.g. 'export-onnx')")
        for label, function in (("run", run), ("arguments", arguments)):
            if function is not None and not callable(function):
                raise PluginError(f"plugin {plugin!r}, command {name!r}: {label} is not callable ({function!r})",
                                  fix=f"pass a function as {label}=")
        if run is None:
            raise PluginError(f"plugin {plugin!r}, command {name!r}: no run function", fix="pass run=FUNCTION(args) -> exit code")
        existing = self._commands.get(name)
        if existing is not None:
            raise PluginError(f"two plugins provide a command named {name!r}: {existing.plugin!r} and {plugin!r}",
                              fix="uninstall or disable one of them, or rename one command")
        self._commands[name] = Command(name, help, run, arguments, description, plugin)

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands.values())

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __len__(self) -> int:
        return len(self._commands)

    def get(self, name: str) -> Command:
        return self._commands[name]

    def names(self) -> list[str]:
        return list(self._commands)


def collect_commands(host) -> Commands:
    """Every command the plugins of ``host`` add, in registration order (built-ins first)."""
    commands = Commands()
    caller = getattr(host.hook, HOOK)
    # Each implementation is called on its own, in registration order (pluggy's own
    # call would go the other way), so that every command is attributed to its plugin.
    for impl in caller.get_hookimpls():
        commands._plugin = impl.plugin_name
        offered = {"commands": commands}
        try:
            impl.function(*[offered[name] for name in impl.argnames])
        except PluginError:
            raise
        except Exception as error:
            raise PluginError(f"plugin {impl.plugin_name!r} raised in {HOOK}: {type(error).__name__}: {error}",
                              fix=f"fix or disable the plugin {impl.plugin_name!r}") from error
    commands._plugin = BUILTIN_PLUGIN
    return commands


def plugin_rows(host) -> list[dict]:
    """:func:`~pyramidkd.engine.host.plugin_listing` of ``host``, with the commands each plugin adds."""
    from ..host import plugin_listing

    rows = plugin_listing(host)
    by_name = {row["name"]: row for row in rows}
    for command in collect_commands(host):
        if command.plugin in by_name:
            by_name[command.plugin]["components"].setdefault("command", []).append(command.name)
    for row in rows:  # kinds in alphabetical order, as plugin_listing gives them
        row["components"] = dict(sorted(row["components"].items()))
    return rows


def _version() -> str:
    from pyramidkd._version import __version__

    return __version__


def build_parser(commands: Commands) -> argparse.ArgumentParser:
    """The ``pyramidkd`` parser: one sub-parser per command; ``--debug`` is declared
    once and accepted before or after the command."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a sub-parser must not reset a --debug given before the command.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    parser = argparse.ArgumentParser(
        prog="pyramidkd",
        description="Knowledge-distillation experiments (Pyramid VGG19 -> SVGG compression) from one TOML recipe.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"pyramidkd {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.description or command.help,
                                    parents=[common])
        if command.arguments is not None:
            try:
                command.arguments(sub)
            except Exception as error:  # e.g. an option that clashes with --debug
                raise PluginError(f"plugin {command.plugin!r}, command {command.name!r}: adding its arguments failed: "
                                  f"{type(error).__name__}: {error}", fix=f"fix or disable the plugin {command.plugin!r}") from error
    return parser
