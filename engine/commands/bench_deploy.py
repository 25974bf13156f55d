"""``pyramidkd bench-deploy RUN_DIR... [--batch-sizes 1,64] [--threads 1,N] [--output DIR]``:
the latency of every exported file of the runs on the runtime it targets, next to
PyTorch eager and torch.compile; a table, JSON and an accuracy-vs-latency plot
(:mod:`pyramidkd.engine.deploy.bench`; docs/deploy.md)."""

from __future__ import annotations

import argparse
import os

NAME = "bench-deploy"
HELP = "latency of a run's exported files (onnxruntime, PyTorch eager, torch.compile): table, JSON, accuracy-vs-latency plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders with exported files in RUN_DIR/export/")
    parser.add_argument("--batch-sizes", default="1,64", metavar="B1,B2", help="batch sizes (default 1,64)")
    parser.add_argument("--threads", default="1,N", metavar="T1,T2", help="CPU threads, N = all cores (default 1,N)")
    parser.add_argument("--budget", type=float, default=1.0, metavar="SECONDS", help="time spent on each measurement (default 1)")
    parser.add_argument("--compile-budget", type=float, default=120.0, metavar="SECONDS",
                        help="seconds torch.compile may spend compiling in all; 0 skips it (default 120)")
    parser.add_argument("--output", "-o", metavar="DIR", help="where the table, JSON and plot go (default: RUN_DIR/bench-deploy/)")


def execute(args: argparse.Namespace) -> int:
    from ..deploy.bench import bench_deploy, parse_counts
    from ..deploy.bench_report import format_results
    from ..errors import UserError

    if args.budget <= 0:
        raise UserError(f"--budget {args.budget:g} must be positive", fix="e.g. --budget 1")
    result = bench_deploy(args.run_dirs, batch_sizes=parse_counts(args.batch_sizes, "--batch-sizes"),
                          threads=parse_counts(args.threads, "--threads"), budget_s=args.budget,
                          compile_budget_s=args.compile_budget, output=args.output)
    print(format_results(result))
    files = result["files"]
    written = [files["table"], files["json"]] + ([files["plot"]] if files["plot"] else [])
    print("written: " + ", ".join(os.path.relpath(path) for path in written))
    return 0
