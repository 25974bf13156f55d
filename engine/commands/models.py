"""``pyramidkd models``: every registered model with its parameters and MACs
(:mod:`pyramidkd.engine.reporting.models`)."""

from __future__ import annotations

import argparse
import json

from ..reporting.models import format_models, list_models

NAME = "models"
HELP = "list every registered model with its parameters and MACs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-classes", type=int, default=10, metavar="C")
    parser.add_argument("--image-size", type=int, default=96, metavar="S")
    parser.add_argument("--width", type=float, default=1.0, metavar="W", help="channel multiplier for models that take one")
    parser.add_argument("--json", action="store_true", help="a JSON list of {name, params, macs, ...}")


def execute(args: argparse.Namespace) -> int:
    rows = list_models(args.num_classes, args.image_size, args.width)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"models for {args.num_classes} classes, {args.image_size}×{args.image_size} RGB input, width {args.width:g} "
              "(MACs: multiply-accumulates of one image, conv + linear layers)")
        print(format_models(rows))
    return 0
