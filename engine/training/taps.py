"""Recording a model's intermediate tensors (its tap points) during a forward pass."""

from __future__ import annotations

import torch
from torch import nn

from ..components import ModelOutput
from ..errors import RecipeError


class TapRecorder:
    """Runs a model and records the tensors at its tap points (forward hooks)."""

    def __init__(self, model: nn.Module, taps: dict[str, str], *, role: str, stage_id: str, forward=None):
        self.model = model
        self.forward = forward if forward is not None else model  # a DDP- or torch.compile-wrapped model
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for tap_name, spec in taps.items():
            path, _, part = spec.partition(":")
            if path not in modules:
                raise RecipeError(
                    f"stage {stage_id!r}: the {role} has no module {path!r} to tap",
                    fix="the scheme and model disagree; check the model names and levels",
                )
            self.handles.append(modules[path].register_forward_hook(self._hook(tap_name, part == "input")))

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
