"""``pyramidkd plugins``: every plugin, where it comes from, and what it provides."""

from __future__ import annotations

import argparse
import json

from .registry import plugin_rows

NAME = "plugins"
HELP = "list plugins and the components they provide"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def execute(args: argparse.Namespace) -> int:
    from ..host import make_plugin_host

    rows = plugin_rows(make_plugin_host())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        version = f" {row['version']}" if row["version"] else ""
        print(f"{row['name']}  [{row['source']}: {row['distribution']}{version}]")
        for kind, names in row["components"].items():
            print(f"    {kind}: {', '.join(names)}")
    return 0
