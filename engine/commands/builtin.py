"""The built-in commands, registered through the same hook a plugin package uses.

The host registers this module first (``host.builtin_plugin_modules``), so the
built-ins come first in ``pyramidkd --help`` and a plugin cannot take their names.
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from . import bench_models, models, plugins, report, run, sweep, validate

BUILTIN_COMMANDS = (run, sweep, validate, models, bench_models, plugins, report)


@hookimpl
def pyramidkd_register_commands(commands):
    for module in BUILTIN_COMMANDS:
        commands.add(module.NAME, help=module.HELP, arguments=module.add_arguments, run=module.execute)
