"""The feature-tap contract at run time: resolving a stage's taps on a built model
and recording the tapped tensors during a forward pass.

A :class:`~pyramidkd.engine.components.StagePlan` maps tap names to *specs*:

* a module path, ``"features.12"`` (the module's output) or ``"features.12:input"``
  (its input) — what the Pyramid schemes set for their ``in`` / ``out`` / ``hint`` taps;
* ``"@NAME"``, a point the model declares in ``tap_points()``: ``feat.0`` (stem),
  ``feat.1`` … ``feat.K`` (stage outputs), ``preact.1`` … ``preact.K``, ``pooled``
  (or any other name the model declares). ``{"feat.*": "@feat.*"}`` taps every stage
  1 … K, recorded as ``feat.1`` … ``feat.K``; ``{"hint": "@feat.2"}`` records the
  model's ``feat.2`` under the name ``hint``.

A stage with no taps registers no hook: an unused tap point costs nothing.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..components import ModelOutput
from ..errors import RecipeError

TAP_POINT = "@"
_STAGE = re.compile(r"(feat|preact)\.(\d+)")
TAP_POINTS_FIX = ("declare tap_points() on the model's nn.Module (tap name -> module path, see docs/plugins.md, "
                  '"Tap points"), or use a model that has them (the zoo, vgg, vgg19 / svgg*, torchvision, timm)')


def tap_point(name: str) -> str:
    """The spec of the model's declared point ``name`` (e.g. ``"feat.2"``)."""
    return TAP_POINT + name


def declared_points(model: nn.Module) -> dict[str, str] | None:
    """The model's ``tap_points()`` (``None`` when it declares none)."""
    method = getattr(model, "tap_points", None)
    return dict(method()) if callable(method) else None


def describe_points(points: dict[str, str]) -> str:
    return ", ".join(points) or "none"


def _expand(name: str, wanted: str, points: dict[str, str]) -> dict[str, str]:
    """``feat.*`` / ``preact.*``: every declared stage 1 … K, named ``<name prefix>.k``."""
    family = wanted[:-2]
    stages = sorted(int(m.group(2)) for point in points if (m := _STAGE.fullmatch(point)) and m.group(1) == family)
    prefix = name[:-2] if name.endswith(".*") else name
    return {f"{prefix}.{k}": points[f"{family}.{k}"] for k in stages if k >= 1}


def resolve_taps(model: nn.Module, taps: dict[str, str], *, role: str, stage_id: str, model_name: str = "") -> dict[str, str]:
    """Tap name -> module spec (``path`` or ``path:input``) on ``model``, every
    ``@`` spec looked up in its ``tap_points()``; errors name the stage, the tap and the fix."""
    label = f"the {role}" + (f" ({model_name})" if model_name else "")
    resolved: dict[str, str] = {}
    points = None
    for name, spec in taps.items():
        if not spec.startswith(TAP_POINT):
            resolved[name] = spec
            continue
        wanted = spec[len(TAP_POINT):]
        points = declared_points(model) if points is None else points
        if points is None:
            what = f"it taps {wanted!r}" if name == wanted else f"tap {name!r} reads {wanted!r}"
            raise RecipeError(f"stage {stage_id!r}: {what}, but {label} declares no tap points", fix=TAP_POINTS_FIX)
        if wanted.endswith(".*") and wanted[:-2] in ("feat", "preact"):
            expanded = _expand(name, wanted, points)
            if not expanded:
                raise RecipeError(f"stage {stage_id!r}: tap {name!r}: {label} declares no {wanted[:-2]}.1 … points "
                                  f"(it declares {describe_points(points)})", fix=TAP_POINTS_FIX)
            resolved.update(expanded)
        elif wanted in points:
            resolved[name] = points[wanted]
        else:
            raise RecipeError(f"stage {stage_id!r}: {label} has no tap point {wanted!r}; it declares {describe_points(points)}",
                              fix=f"read one of those points instead of {wanted!r} (a loss's layer parameters choose them, "
                              "e.g. hint_layer of hint, layers of mse and gram)")
    return resolved


def hook_targets(model: nn.Module, resolved: dict[str, str], *, role: str, stage_id: str, model_name: str = "") -> list[tuple[str, nn.Module, bool]]:
    """(tap name, module, whether its input is wanted) for each resolved spec."""
    modules = dict(model.named_modules())
    targets = []
    for name, spec in resolved.items():
        path, _, part = spec.partition(":")
        if path not in modules:
            raise RecipeError(
                f"stage {stage_id!r}: the {role}" + (f" ({model_name})" if model_name else "") + f" has no module {path!r} to tap (tap {name!r})",
                fix="the path comes from the scheme or from the model's tap_points(): name a module the model has "
                "(print(model) lists them)",
            )
        module = modules[path]
        if part == "input" and getattr(module, "inplace", False):
            raise RecipeError(
                f"stage {stage_id!r}: tap {name!r} reads the input of {path!r}, an in-place activation that overwrites it",
                fix="make that activation non-inplace in the model (e.g. nn.ReLU() instead of nn.ReLU(inplace=True))",
            )
        targets.append((name, module, part == "input"))
    return targets


class TapRecorder:
    """Runs a model and records the tensors at its tap points (forward hooks)."""

    def __init__(self, model: nn.Module, taps: dict[str, str], *, role: str, stage_id: str, forward=None, model_name: str = ""):
        self.model = model
        self.forward = forward if forward is not None else model  # a DDP- or torch.compile-wrapped model
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        resolved = resolve_taps(model, taps, role=role, stage_id=stage_id, model_name=model_name) if taps else {}
        for tap_name, module, want_input in hook_targets(model, resolved, role=role, stage_id=stage_id, model_name=model_name):
            self.handles.append(module.register_forward_hook(self._hook(tap_name, want_input)))

    def _hook(self, name: str, want_input: bool):
        def record(module, inputs, output):
            self.values[name] = inputs[0] if want_input else output

        return record

    def __call__(self, images: torch.Tensor) -> ModelOutput:
        self.values = {}
        logits = self.forward(images)
        return ModelOutput(logits, self.values)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
