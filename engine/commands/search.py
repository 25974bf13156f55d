"""``pyramidkd search SEARCH.toml``: an Optuna study over a recipe's values, each
trial x seed an ordinary run folder under DIR run by a sweep launcher, continued
when run again; then the best values' test accuracy on fresh seeds
(:mod:`pyramidkd.engine.search`)."""

from __future__ import annotations

import argparse

from .arguments import add_launch_arguments, positive_int, report_launch

NAME = "search"
HELP = "search a recipe's hyperparameters with Optuna (trials run locally, on Ray or on Slurm)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_launch_arguments(parser, "search", "recipes/quickstart-search.toml")
    parser.add_argument("--trials", type=positive_int, metavar="N",
                        help="run until the study holds N trials (instead of [search] trials); again with a larger N adds trials")
    parser.add_argument("--dry-run", action="store_true", help="validate the search file and its recipe, show the plan, run nothing")


def execute(args: argparse.Namespace) -> int:
    from ..search.results import format_results
    from ..search.search import describe, plan_search, run_search
    from ..sweeps.sweep import sigterm_as_interrupt

    setup = plan_search(args.search, output=args.output, launcher=args.launcher, trials=args.trials)
    if args.dry_run:
        print(describe(setup))
        return 0
    with sigterm_as_interrupt():  # a stopped search lets its runs save, as Ctrl-C does
        outcome = run_search(setup)
    return report_launch(outcome, format_results(outcome.results), "results.json, results.csv, plots/")
