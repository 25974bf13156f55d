"""``pyramidkd run RECIPE``: run a recipe, or continue one (``--seeds``: one run per
seed, a one-cell sweep, :mod:`pyramidkd.engine.sweeps.seeds`)."""

from __future__ import annotations

import argparse
import sys

from .arguments import add_recipe_arguments, positive_int

NAME = "run"
HELP = "run a recipe"


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
        return _run_seeds(args)
    from ..runner import run_recipe

    run_recipe(args.recipe, args.overrides, output=args.output, quiet=args.quiet, force=args.force, resume=args.resume,
               max_epochs=args.max_epochs)
    return 0


def _run_seeds(args: argparse.Namespace) -> int:
    from ..reporting.seeds_report import format_seeds_table
    from ..sweeps.seeds import parse_seeds, run_seeds

    outcome = run_seeds(args.recipe, args.overrides, parse_seeds(args.seeds), output=args.output, quiet=args.quiet,
                        force=args.force, resume=args.resume, max_epochs=args.max_epochs)
    if problems := outcome.problems():
        print(problems, file=sys.stderr)
    if outcome.results["cells"][0]["seeds"]:  # some seed finished
        print(format_seeds_table(outcome.results))
    print(f"results: {outcome.folder}")
    return outcome.exit_code
