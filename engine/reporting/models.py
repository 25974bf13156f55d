"""``pyramidkd models``: every registered model with its parameters and MACs.

MACs (multiply-accumulates) of one image's forward pass are counted with forward
hooks on ``Conv2d`` and ``Linear`` layers (the layers that dominate a VGG; pools,
ReLUs, batch norm and dropout are not counted).
"""

from __future__ import annotations

import attrs

from ..errors import UserError
from ..formatting import format_count, format_table
from ..training.models import count_macs, count_parameters


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


def list_models(num_classes: int, image_size: int, width: float) -> list[dict]:
    """:func:`describe_models` of every installed model plugin, the sizes checked first."""
    from ..host import make_plugin_host

    for name, value in (("--num-classes", num_classes), ("--image-size", image_size)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}", fix=f"pass a positive {name}")
    if not width > 0:
        raise UserError(f"--width must be > 0, got {width}", fix="pass a positive channel multiplier, e.g. --width 0.25")
    return describe_models(make_plugin_host().registry("model"), num_classes, image_size, width)


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
