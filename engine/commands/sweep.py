"""``pyramidkd sweep SWEEP.toml``: every cell (recipe x grid values) x seed as an
ordinary run folder under DIR, run by a launcher plugin, then ``results.json``,
``results.csv`` and ``results.md`` with mean ± std and paired comparisons."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from .run import positive_int

NAME = "sweep"
HELP = "run recipes over a grid of values and seeds (locally, on Ray or on Slurm)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", metavar="SWEEP", help="a sweep file, e.g. examples/sweeps/quickstart-temperature.toml")
    parser.add_argument("--output", "-o", metavar="DIR", help="the sweep folder (default: runs/<sweep name>)")
    parser.add_argument("--launcher", metavar="NAME", help="run with this launcher instead of [launcher] name (local, ray, slurm)")
    parser.add_argument("--dry-run", action="store_true", help="validate every cell, list the cells and runs, run nothing")
    parser.add_argument("--force", action="store_true",
                        help="continue a folder that holds a different sweep, or runs whose recipe changed")
    parser.add_argument("--max-epochs", type=positive_int, metavar="N", help="train every stage at most N epochs (a quick trial)")


def execute(args: argparse.Namespace) -> int:
    from ..host import make_plugin_host
    from ..sweeps.folder import SweepFolder
    from ..sweeps.spec import load_sweep
    from ..sweeps.sweep import check_cells, describe, execute as execute_sweep, plan_runs

    host = make_plugin_host()
    plan = load_sweep(args.sweep, launcher=args.launcher, registry=host.registry("launcher"))
    prepared = check_cells(plan, args.max_epochs)
    folder = SweepFolder(args.output or os.path.join("runs", plan.name))
    runs = plan_runs(plan, folder, prepared)
    if args.dry_run:
        print(describe(plan, runs, folder))
        return 0
    with _sigterm_as_interrupt():  # a stopped sweep lets its runs save, as Ctrl-C does
        outcome = execute_sweep(plan, folder, runs, force=args.force, max_epochs=args.max_epochs)
    return finish(outcome)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def validate_sweep(path: str, overrides: list[str]) -> int:
    """``pyramidkd validate SWEEP.toml``: the sweep file and every cell's recipe."""
    from ..errors import UserError
    from ..host import make_plugin_host
    from ..sweeps.spec import load_sweep
    from ..sweeps.sweep import check_cells

    if overrides:
        raise UserError("--set applies to recipes, not to sweep files", file=path,
                        fix="put the value in the sweep file's [sweep] set table (every cell) or [grid] (an axis)")
    plan = load_sweep(path, registry=make_plugin_host().registry("launcher"))
    prepared = check_cells(plan)
    print(f"{path}: ok — sweep {plan.name}: {len(plan.cells)} cell(s) x {len(plan.seeds)} seed(s), "
          f"launcher {plan.launcher.instantiate().describe()}")
    for cell in plan.cells:
        stages = prepared[cell.id].stages
        print(f"  {cell.id}: {len(stages)} stage(s), {sum(s.train.epochs for s in stages)} epochs")
    return 0


def finish(outcome, *, show_results: bool = True) -> int:
    """Aggregate what finished, print it, and list the failed runs: 0 when every run
    finished, 1 when some failed, 130 after Ctrl-C."""
    from ..sweeps.results import collect_results, format_results, write_results

    results = collect_results(outcome.folder)
    write_results(outcome.folder, results)
    if show_results:
        print(format_results(results))
        print(f"results: {os.path.join(outcome.folder, 'results.md')} (and results.json, results.csv)")
    if outcome.interrupted:
        print("sweep interrupted: run the same command again to continue (finished runs are kept, "
              "interrupted ones continue from their last checkpoint)", file=sys.stderr)
        return 130
    if outcome.failed:
        print(f"{len(outcome.failed)} run(s) failed:", file=sys.stderr)
        for run, record in outcome.failed:
            print(f"  {run.key}: {record['error']}\n    folder: {run.folder}\n    log: {run.log_file}", file=sys.stderr)
        print("fix the cause and run the same command again: finished runs are kept", file=sys.stderr)
        return 1
    return 0
