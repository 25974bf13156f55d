"""The built-in commands, registered through the same hook a plugin package uses.

The host registers this module first (``host.builtin_plugin_modules``), so the
built-ins come first in ``pyramidkd --help`` and a plugin cannot take their names.
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from . import bench_deploy, bench_models, convert_checkpoint, export, models, plugins, report, run, save_weights, search, sweep, validate
from .registry import Commands

BUILTIN_COMMANDS = (run, sweep, search, validate, models, bench_models, plugins, report, save_weights, convert_checkpoint, export, bench_deploy)


@hookimpl
def pyramidkd_register_commands(commands):
    for module in BUILTIN_COMMANDS:
        commands.add(module.NAME, help=module.HELP, arguments=module.add_arguments, run=module.execute)


def builtin_commands() -> Commands:
    """The built-in commands alone (when the plugins cannot be loaded)."""
    commands = Commands()
    pyramidkd_register_commands(commands)
    return commands
