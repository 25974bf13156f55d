"""VGG-style networks: 3×3 convolutions, 2×2 max-pooling, a 1-FC or 3-FC head.

Every model takes ``width`` (channel multiplier) and adapts its head to the input
size, so tests and CPU recipes can run small versions of the published models.
The building blocks here are shared by the Pyramid family (VGG19 and SVGGs).

Tap points (``tap_points()``, the contract of :mod:`pyramidkd.plugins.models.zoo_common`):
a *conv group* is a run of convolutions between two max-pools, i.e. one resolution.
The first group is the stem, each later group a stage, as in the zoo's ``vgg*_bn``:
``feat.0`` is the stem group's last ReLU output (full resolution), ``feat.k`` the
k-th later group's last ReLU output, taken *before* the pool that follows it,
``preact.k`` that ReLU's input (the conv output, or its BN's), and ``pooled`` the
classifier's input (the flattened last map). A group's last ReLU is therefore not
in-place (an in-place one would overwrite the pre-activation); the others are.
"""

from __future__ import annotations

from typing import Literal, Sequence

import attrs
from torch import nn

from pyramidkd.engine import FieldValueError, Model, UserError, between, hookimpl, positive

POOL = "M"
STANDARD_CONFIGS = {
    11: [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    13: [64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    16: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL],
    19: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL],
}


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def conv_layers(config: Sequence[int | str], in_channels: int, width: float, batch_norm: bool) -> tuple[list[nn.Module], int, int]:
    """Layers for a VGG config; returns (layers, out_channels, number of pools)."""
    layers: list[nn.Module] = []
    pools = 0
    for index, item in enumerate(config):
        if item == POOL:
            layers.append(nn.MaxPool2d(2, 2))
            pools += 1
            continue
        out_channels = scaled(int(item), width)
        layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        ends_group = index + 1 == len(config) or config[index + 1] == POOL
        layers.append(nn.ReLU(inplace=not ends_group))  # a group's output: its input is the tapped preact
        in_channels = out_channels
    return layers, in_channels, pools


def group_ends(layers: Sequence[nn.Module]) -> list[int]:
    """Indices of each conv group's last ReLU (a group: the convs between two pools)."""
    ends = []
    for index, layer in enumerate(layers):
        following = layers[index + 1] if index + 1 < len(layers) else None
        if isinstance(layer, nn.ReLU) and not isinstance(following, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)):
            ends.append(index)
    return ends


def contract_points(group_paths: Sequence[str], pooled: str) -> dict[str, str]:
    """Tap points from the module paths of each conv group's last ReLU (stem first)."""
    points = {"feat.0": group_paths[0]} if group_paths else {}
    points.update({f"feat.{k}": path for k, path in enumerate(group_paths[1:], start=1)})
    points.update({f"preact.{k}": f"{path}:input" for k, path in enumerate(group_paths[1:], start=1)})
    points["pooled"] = pooled
    return points


def feature_size(image_size: int, pools: int, model_name: str) -> int:
    size = image_size
    for _ in range(pools):
        size //= 2
    if size < 1:
        raise UserError(
            f"model {model_name!r}: {pools} pooling layers shrink a {image_size}×{image_size} input to nothing",
            fix=f"use image_size >= {2 ** pools} or a shallower model",
        )
    return size


def make_head(kind: str, in_features: int, num_classes: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    if kind == "1fc":  # the Pyramid paper's head: Dropout + Linear
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    layers: list[nn.Module] = []
    for units in hidden:
        layers += [nn.Linear(in_features, units), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_features = units
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """torchvision-style init: Kaiming fan-out for convs, N(0, 0.01) for linears.

    PyTorch's default init leaves a deep plain VGG unable to learn (see README)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class VGGNet(nn.Module):
    """``features`` (convs and pools) -> flatten -> ``classifier``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.classifier = classifier
        groups = [f"features.{index}" for index in group_ends(list(features))]
        self.points = contract_points(groups, "classifier:input")

    def forward(self, images):
        return self.classifier(self.features(images).flatten(1))

    def tap_points(self) -> dict[str, str]:
        """The tap contract's points (see the module docstring)."""
        return dict(self.points)


def _check_config(instance, attribute, value):
    for item in value:
        if item != POOL and not (isinstance(item, int) and item > 0):
            raise FieldValueError(f"entries must be positive channel counts or \"M\" (max-pool), got {item!r}", "e.g. layers = [32, \"M\", 64, \"M\"]")


@attrs.define
class VGGParams:
    depth: Literal[11, 13, 16, 19] = attrs.field(default=11, metadata={"help": "a standard VGG depth, used when layers is empty"})
    layers: list[int | str] = attrs.field(factory=list, validator=_check_config, metadata={"help": 'explicit config, e.g. [32, "M", 64, "M"]'})
    width: float = attrs.field(default=1.0, validator=positive, metadata={"help": "channel multiplier, e.g. 0.25"})
    batch_norm: bool = True
    head: Literal["1fc", "3fc"] = "1fc"
    hidden: list[int] = attrs.field(factory=lambda: [512, 512], metadata={"help": "hidden units of the 3fc head"})
    dropout: float = attrs.field(default=0.5, validator=between(0.0, 1.0))


class VGG(Model):
    """A VGG with a standard depth or an explicit layer list, any width."""

    name = "vgg"
    Params = VGGParams

    def build(self, num_classes, input_shape):
        p = self.params
        config = p.layers or STANDARD_CONFIGS[p.depth]
        layers, channels, pools = conv_layers(config, input_shape[0], p.width, p.batch_norm)
        size = feature_size(input_shape[1], pools, self.name)
        hidden = [scaled(h, p.width) for h in p.hidden]
        model = VGGNet(nn.Sequential(*layers), make_head(p.head, channels * size * size, num_classes, hidden, p.dropout))
        init_weights(model)
        return model


@hookimpl
def pyramidkd_register_models():
    return [VGG]
