"""``pyramidkd report RUN_DIR...``: tables and plots of finished runs, ``run --seeds``
folders and sweeps (:mod:`pyramidkd.engine.reporting`); plots go to ``DIR/plots/``."""

from __future__ import annotations

import argparse
import json

from ..reporting.report import build_reports, format_markdown

NAME = "report"
HELP = "tables and plots of finished runs (writes RUN_DIR/plots/*.png)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (or a `run --seeds` or `sweep` folder), e.g. runs/quickstart-20250101-120000")
    parser.add_argument("--format", choices=["markdown", "json"], default="markdown", help="output format (default: markdown)")


def execute(args: argparse.Namespace) -> int:
    reports = build_reports(args.runs)
    if args.format == "json":
        print(json.dumps({"runs": reports}, indent=2))
    else:
        print(format_markdown(reports), end="")
    return 0
