"""``pyramidkd sweep SWEEP.toml``: every cell (recipe x grid values) x seed as an
ordinary run folder under DIR, run by a launcher plugin, then ``results.json``,
``results.csv`` and ``results.md`` with mean ± std and paired comparisons
(:mod:`pyramidkd.engine.sweeps`)."""

from __future__ import annotations

import argparse

from .arguments import add_launch_arguments, positive_int, report_launch

NAME = "sweep"
HELP = "run recipes over a grid of values and seeds (locally, on Ray or on Slurm)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_launch_arguments(parser, "sweep", "recipes/quickstart-sweep.toml")
    parser.add_argument("--dry-run", action="store_true", help="validate every cell, list the cells and runs, run nothing")
    parser.add_argument("--force", action="store_true",
                        help="continue a folder that holds a different sweep, or runs whose recipe changed")
    parser.add_argument("--max-epochs", type=positive_int, metavar="N", help="train every stage at most N epochs (a quick trial)")


def execute(args: argparse.Namespace) -> int:
    from ..sweeps.results import format_results
    from ..sweeps.sweep import describe, plan_sweep, run_sweep, sigterm_as_interrupt

    setup = plan_sweep(args.sweep, output=args.output, launcher=args.launcher, max_epochs=args.max_epochs)
    if args.dry_run:
        print(describe(setup))
        return 0
    with sigterm_as_interrupt():  # a stopped sweep lets its runs save, as Ctrl-C does
        outcome = run_sweep(setup, force=args.force)
    return report_launch(outcome, format_results(outcome.results), "results.json, results.csv")
