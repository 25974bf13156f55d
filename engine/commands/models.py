"""``pyramidkd models``: every registered model with its parameters and MACs.

MACs (multiply-accumulates) of one image's forward pass are counted with forward
hooks on ``Conv2d`` and ``Linear`` layers (the layers that dominate a VGG; pools,
ReLUs, batch norm and dropout are not counted).
"""

from __future__ import annotations

import argparse
import json

import attrs

from ..errors import UserError
from ..formatting import format_count, format_table
from ..training.models import count_macs, count_parameters

NAME = "models"
HELP = "list every registered model with its parameters and MACs"


def default_params(cls, width: float):
    """A model class's default Params, with ``width`` where it has one."""
    fields = {field.name for field in attrs.fields(cls.Params)}
    return cls.Params(width=width) if "width" in fields else cls.Params()


def describe_models(registry, num_classes: int, image_size: int, width: float, channels: int = 3) -> list[dict]:
    """One row per registered model, built on the CPU with default Params (``width`` where it has one)."""
    rows = []
    input_shape = (channels, image_size, image_size)
    for registration in registry:  # registration order: plugin by plugin
        cls = registration.cls
        has_width = "width" in {field.name for field in attrs.fields(cls.Params)}
        row = {
            "name": cls.name,
            "params": None,
            "macs": None,
            "width": width if has_width else None,
            "num_classes": num_classes,
            "image_size": image_size,
            "plugin": registration.plugin,
            "description": cls.summary(),
        }
        try:
            model = cls(default_params(cls, width)).build(num_classes, input_shape)
            row["params"], row["macs"] = count_parameters(model), count_macs(model, input_shape)
        except (UserError, RuntimeError, ValueError, TypeError) as error:
            row["error"] = str(error).splitlines()[0]
        rows.append(row)
    return rows


def format_models(rows: list[dict]) -> str:
    table = [
        {
            "name": row["name"],
            "params": format_count(row["params"]),
            "MACs": format_count(row["macs"]),
            "description": f"error: {row['error']}" if row.get("error") else row["description"],
        }
        for row in rows
    ]
    return format_table(table, right={"params", "MACs"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-classes", type=int, default=10, metavar="C")
    parser.add_argument("--image-size", type=int, default=96, metavar="S")
    parser.add_argument("--width", type=float, default=1.0, metavar="W", help="channel multiplier for models that take one")
    parser.add_argument("--json", action="store_true", help="a JSON list of {name, params, macs, ...}")


def execute(args: argparse.Namespace) -> int:
    from ..host import make_plugin_host

    for name, value in (("--num-classes", args.num_classes), ("--image-size", args.image_size)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}", fix=f"pass a positive {name}")
    if not args.width > 0:
        raise UserError(f"--width must be > 0, got {args.width}", fix="pass a positive channel multiplier, e.g. --width 0.25")
    rows = describe_models(make_plugin_host().registry("model"), args.num_classes, args.image_size, args.width)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"models for {args.num_classes} classes, {args.image_size}×{args.image_size} RGB input, width {args.width:g} "
              "(MACs: multiply-accumulates of one image, conv + linear layers)")
        print(format_models(rows))
    return 0
