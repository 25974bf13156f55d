"""Argument types and groups that several commands share."""

from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (anything else is a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """RECIPE and ``--set``: what ``run`` and ``validate`` share."""
    parser.add_argument("recipe", metavar="RECIPE", help="a .toml recipe, e.g. recipes/quickstart.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set train.epochs=3 (repeatable)")


def add_launch_arguments(parser: argparse.ArgumentParser, kind: str, example: str) -> None:
    """The file, ``--output`` and ``--launcher``: what ``sweep`` and ``search`` share
    (``kind`` names the file and its folder: "sweep", "search")."""
    parser.add_argument(kind, metavar=kind.upper(), help=f"a {kind} file, e.g. {example}")
    parser.add_argument("--output", "-o", metavar="DIR", help=f"the {kind} folder (default: runs/<{kind} name>)")
    parser.add_argument("--launcher", metavar="NAME", help="run with this launcher instead of [launcher] name (local, ray, slurm)")


def report_launch(outcome, table: str, also: str) -> int:
    """Print a sweep's or a search's results table and files (stdout) and its problems
    (stderr); return its exit code."""
    print(table)
    print(f"results: {outcome.results_file} (and {also})")
    if problems := outcome.problems():
        print(problems, file=sys.stderr)
    return outcome.exit_code
