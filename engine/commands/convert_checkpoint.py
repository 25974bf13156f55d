"""``pyramidkd convert-checkpoint FILE [--trust] [--output PATH]``: rewrite a
checkpoint that does not read as data only (one from pyramidkd 0.1.0 or another
tool) as plain data, for a file whose source the user vouches for."""

from __future__ import annotations

import argparse

NAME = "convert-checkpoint"
HELP = "rewrite a checkpoint you trust as plain data that reads weights-only (see docs/security.md)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="the checkpoint (.pt) to rewrite")
    parser.add_argument("--trust", action="store_true",
                        help="you vouch for the file: allow, for this one read, the Python globals it names (listed first)")
    parser.add_argument("--output", "-o", metavar="PATH", help="write the result here (default: replace FILE)")


def execute(args: argparse.Namespace) -> int:
    from ..training.sharing import convert_checkpoint

    done = convert_checkpoint(args.file, trust=args.trust, output=args.output)
    allowed = f"read with {', '.join(done.allowed)} allowed (--trust)" if done.allowed else "it read as data already"
    print(f"{done.output}: rewritten as plain data ({allowed}); it now reads weights-only")
    return 0
