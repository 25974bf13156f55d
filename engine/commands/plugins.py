"""``pyramidkd plugins``: every plugin, where it comes from, and what it provides;
``--params [NAME]``: the parameter reference of every component (or one)."""

from __future__ import annotations

import argparse
import json

from .registry import plugin_rows

NAME = "plugins"
HELP = "list plugins and the components they provide (--params: every component's keys)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--params", nargs="?", const="", default=None, metavar="NAME",
                        help="the keys of every component and recipe section (or of NAME): type, default, range, help")
    parser.add_argument("--markdown", action="store_true",
                        help="with --params: the built-in components as markdown (docs/reference.md)")


def execute(args: argparse.Namespace) -> int:
    from ..host import make_plugin_host

    host = make_plugin_host()
    if args.params is not None or args.markdown:
        return _print_reference(host, args)
    rows = plugin_rows(host)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        version = f" {row['version']}" if row["version"] else ""
        print(f"{row['name']}  [{row['source']}: {row['distribution']}{version}]")
        for kind, names in row["components"].items():
            print(f"    {kind}: {', '.join(names)}")
    return 0


def _print_reference(host, args: argparse.Namespace) -> int:
    from ..reporting.reference import format_reference_markdown, format_reference_text, reference_entries

    entries = reference_entries(host, args.params or None, builtin_only=args.markdown)
    if args.json:
        print(json.dumps(entries, indent=2))
    elif args.markdown:
        print(format_reference_markdown(entries), end="")
    else:
        print(format_reference_text(entries))
    return 0
