"""``pyramidkd run RECIPE``: run a recipe, or continue one (``--seeds``: one run per seed)."""

from __future__ import annotations

import argparse

NAME = "run"
HELP = "run a recipe"


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--output", "-o", metavar="DIR", help="run directory (default: runs/<experiment>-<time>)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or epoch lines (CI)")
    parser.add_argument("--seeds", metavar="S1,S2,...", help="run once per seed (DIR/seed-N each, a one-axis sweep) and report mean ± std")
    parser.add_argument("--max-epochs", type=positive_int, metavar="N",
                        help="train every stage at most N epochs, scheme-planned stages included (a quick trial of a chain)")
    parser.add_argument("--resume", action="store_true", help="continue the run in DIR from its last completed step")
    parser.add_argument("--force", action="store_true",
                        help="recompute every stage in DIR; with --resume: accept a changed recipe")


def execute(args: argparse.Namespace) -> int:
    if args.seeds:
        from .seeds import parse_seeds, run_seeds

        return run_seeds(args.recipe, args.overrides, parse_seeds(args.seeds), output=args.output, quiet=args.quiet,
                         force=args.force, resume=args.resume, max_epochs=args.max_epochs)
    from ..runner import run_recipe

    run_recipe(args.recipe, args.overrides, output=args.output, quiet=args.quiet, force=args.force, resume=args.resume,
               max_epochs=args.max_epochs)
    return 0
