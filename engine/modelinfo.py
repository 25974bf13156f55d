"""``pyramidkd models``: every registered model with its parameters and MACs.

MACs (multiply-accumulates) of one image's forward pass are counted with forward
hooks on ``Conv2d`` and ``Linear`` layers (the layers that dominate a VGG; pools,
ReLUs, batch norm and dropout are not counted).
"""

from __future__ import annotations

import json

import attrs
import torch
from torch import nn

from .errors import UserError


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of ``Conv2d`` and ``Linear`` layers for one input
    (one forward pass of a zero image on the model's device)."""
    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output):
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1]
        total += output[0].numel() * (module.in_channels // module.groups) * kernel

    def linear_hook(module: nn.Linear, inputs, output):
        nonlocal total
        total += output[0].numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        device = next(iter(model.parameters()), torch.empty(0)).device
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def measure(component, num_classes: int, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(parameters, MACs) of a model component, built on the CPU."""
    model = component.build(num_classes, input_shape)
    return count_parameters(model), count_macs(model, input_shape)


def _short(count: int | None) -> str:
    if count is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= limit:
            return f"{count / limit:.2f}{suffix}"
    return str(count)


def describe_models(registry, num_classes: int, image_size: int, width: float, channels: int = 3) -> list[dict]:
    """One row per registered model, built with default Params (``width`` where it has one)."""
    rows = []
    input_shape = (channels, image_size, image_size)
    for registration in registry:  # registration order: plugin by plugin
        cls = registration.cls
        fields = {f.name for f in attrs.fields(cls.Params)}
        params = cls.Params(width=width) if "width" in fields else cls.Params()
        row = {
            "name": cls.name,
            "params": None,
            "macs": None,
            "width": width if "width" in fields else None,
            "num_classes": num_classes,
            "image_size": image_size,
            "plugin": registration.plugin,
            "description": cls.summary(),
        }
        try:
            row["params"], row["macs"] = measure(cls(params), num_classes, input_shape)
        except (UserError, RuntimeError, ValueError, TypeError) as error:
            row["error"] = str(error).splitlines()[0]
        rows.append(row)
    return rows


def format_models(rows: list[dict]) -> str:
    headers = ["name", "params", "MACs", "description"]
    table = [
        [row["name"], _short(row["params"]), _short(row["macs"]), row.get("error") and f"error: {row['error']}" or row["description"]]
        for row in rows
    ]
    widths = [max(len(headers[i]), *(len(r[i]) for r in table)) if table else len(headers[i]) for i in range(len(headers))]
    right = {1, 2}  # numbers right-aligned

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in table)])


def models_command(args) -> int:
    from .host import make_plugin_host

    for name, value in (("--num-classes", args.num_classes), ("--image-size", args.image_size)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}", fix=f"pass a positive {name}")
    if not args.width > 0:
        raise UserError(f"--width must be > 0, got {args.width}", fix="pass a positive channel multiplier, e.g. --width 0.25")
    host = make_plugin_host()
    rows = describe_models(host.registry("model"), args.num_classes, args.image_size, args.width)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"models for {args.num_classes} classes, {args.image_size}×{args.image_size} RGB input, width {args.width:g} "
              "(MACs: multiply-accumulates of one image, conv + linear layers)")
        print(format_models(rows))
    return 0
