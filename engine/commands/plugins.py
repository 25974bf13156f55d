"""``pyramidkd plugins``: every plugin, where it comes from, and what it provides."""

from __future__ import annotations

import argparse
import json

NAME = "plugins"
HELP = "list plugins and the components they provide"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def listing() -> list[dict]:
    """:func:`~pyramidkd.engine.host.plugin_listing`, with the commands each plugin adds."""
    from ..host import make_plugin_host, plugin_listing
    from .registry import collect_commands

    host = make_plugin_host()
    rows = plugin_listing(host)
    by_name = {row["name"]: row for row in rows}
    for command in collect_commands(host):
        if command.plugin in by_name:
            by_name[command.plugin]["components"].setdefault("command", []).append(command.name)
    for row in rows:  # kinds in alphabetical order, as plugin_listing gives them
        row["components"] = dict(sorted(row["components"].items()))
    return rows


def execute(args: argparse.Namespace) -> int:
    rows = listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        version = f" {row['version']}" if row["version"] else ""
        print(f"{row['name']}  [{row['source']}: {row['distribution']}{version}]")
        for kind, names in row["components"].items():
            print(f"    {kind}: {', '.join(names)}")
    return 0
