"""Models of a stage: built from a spec, rebuilt from a checkpoint, weights copied."""

from __future__ import annotations

import torch
from torch import nn

from ..components import ComponentSpec, DataSplits
from ..errors import CheckpointError, RecipeError
from ..validation import Structurer


def build_model(spec: ComponentSpec, data: DataSplits) -> nn.Module:
    return spec.instantiate().build(data.num_classes, tuple(data.input_shape))


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


def training_macs(student_macs: int, teacher_macs: int, images: int, epochs: int) -> int:
    """A stage's training cost in MACs: per image a forward and a backward pass of
    the student (backward ~ twice the forward: 3x in all) plus one forward pass of
    each teacher, for every training image of every epoch (evaluation not counted)."""
    return epochs * images * (3 * student_macs + teacher_macs)


def model_from_checkpoint(checkpoint: dict, path: str, host) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes (its class from ``host``'s registry)
    and load its weights; returns the model and the checkpoint's model description."""
    description = checkpoint.get("model") or {}
    name = description.get("name")
    try:
        cls = host.registry("model").get(name)
    except RecipeError as error:
        raise CheckpointError(f"the checkpoint's model {name!r} is not available: {error.message}", file=path, fix=error.fix) from None
    params = Structurer(path).structure(cls.Params, description.get("params", {}), "model")
    instance = cls(params)
    # The checkpoint's weights replace whatever build() loads: a model that would fetch
    # pretrained weights (torchvision, timm) offers build_for_checkpoint, which does not.
    build = getattr(instance, "build_for_checkpoint", instance.build)
    model = build(description["num_classes"], tuple(description["input_shape"]))
    load_state(model, checkpoint["state_dict"], path)
    return model, description


def load_state(model: nn.Module, state: dict, path: str) -> None:
    """Load ``state`` into ``model``; a mismatch names the tensors (CheckpointError)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", mismatched)):
            if keys:
                details.append(f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        raise CheckpointError(
            "the checkpoint does not fit this model architecture; " + "; ".join(details),
            file=path,
            fix="use a checkpoint of the same model with the same width, image size and classes",
        )
    model.load_state_dict(state)


def inherit_weights(student: nn.Module, source_state: dict) -> list[str]:
    """Copy every tensor the student shares with the source (same name and shape)."""
    own = student.state_dict()
    shared = {k: v for k, v in source_state.items() if k in own and own[k].shape == v.shape}
    student.load_state_dict(shared, strict=False)
    return sorted(shared)
