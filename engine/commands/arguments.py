"""Argument types and groups that several commands share."""

from __future__ import annotations

import argparse


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
