"""CIFAR ResNets of the KD literature (CRD, ICLR 2020; RepDistiller models/resnet.py
and models/resnetv2.py; mdistiller models/cifar/resnet.py, resnetv2.py).

``resnet8`` … ``resnet110``, ``resnet8x4``, ``resnet32x4`` (He et al. 2016, the CIFAR
design): a 3×3 stem conv, three stages of BasicBlocks (depth = 6n + 2, n blocks a
stage), strides 1 / 2 / 2, channels (stem, stages) 16 / 16, 32, 64 — 32 / 64, 128, 256
for the ×4 models. A block whose shape changes adds through a 1×1 conv + BN
projection (the reference's ``downsample``; for ×4 also in stage 1, 32 → 64).

``resnet50``: RepDistiller's resnetv2.py ResNet50 for 32×32 inputs — a 3×3 stride-1
stem of 64 channels (no max-pool), bottleneck stages [3, 4, 6, 3] of 64 / 128 / 256 /
512 planes (×4 out), strides 1 / 2 / 2 / 2; 23.7 M parameters at 100 classes.

``resnet_blocks``: the 16/32/64 design with any basic blocks per stage (``blocks = [9, 9,
5]``): a level of the Pyramid's depth ladder resnet110 → resnet56 → resnet32 → resnet20 →
resnet8 on the way from one depth to the next (``PYRAMID_LADDER``).

Global average pooling replaces the reference's ``AvgPool2d(8)`` (the same at 32×32)
so 96×96 inputs work too. Every block ends in a non-inplace ``out_relu`` module
(the reference's ``F.relu``), so ``preact.k`` is ``layer{k}.{last}.out_relu:input``.
"""

from __future__ import annotations

import attrs
from torch import nn

from pyramidkd.engine import hookimpl
from pyramidkd.plugins.models.zoo_common import (
    TappedNet, activation_taps, global_pool, init_like_reference, stage_blocks_field, zoo_model_class,
)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """The 1×1 conv + BN shortcut used when a block changes the shape."""
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, + shortcut, ReLU (resnet.py's BasicBlock and keys)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        changes_shape = stride != 1 or in_planes != planes
        self.downsample = projection(in_planes, planes, stride) if changes_shape else None
        self.out_relu = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.out_relu(out + shortcut)


class Bottleneck(nn.Module):
    """1×1-BN-ReLU, 3×3 (stride)-BN-ReLU, 1×1 (×4)-BN, + shortcut, ReLU (resnetv2.py's keys)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        changes_shape = stride != 1 or in_planes != out_planes
        self.shortcut = projection(in_planes, out_planes, stride) if changes_shape else nn.Identity()
        self.out_relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.out_relu(out + self.shortcut(x))


class CifarResNet(TappedNet):
    """stem (conv1, bn1, relu) -> layer1 … layerK -> avgpool -> flatten -> head.

    ``head_name`` is ``fc`` (resnet.py) or ``linear`` (resnetv2.py), to keep the keys."""

    def __init__(self, block: type[nn.Module], stem_planes: int, stage_planes: list[int], blocks_per_stage: list[int],
                 num_classes: int, in_channels: int = 3, head_name: str = "fc"):
        super().__init__()
        self.conv1 = conv3x3(in_channels, stem_planes)
        self.bn1 = nn.BatchNorm2d(stem_planes)
        self.relu = nn.ReLU(inplace=True)
        in_planes = stem_planes
        self.stage_names = []
        for index, (planes, blocks) in enumerate(zip(stage_planes, blocks_per_stage), start=1):
            strides = [1 if index == 1 else 2] + [1] * (blocks - 1)
            layers = []
            for stride in strides:
                layers.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            self.stage_names.append(f"layer{index}")
        self.avgpool, self.flatten = global_pool()
        self.head_name = head_name
        self.add_module(head_name, nn.Linear(in_planes, num_classes))
        self.stem_tap = "relu"
        self.stage_taps = tuple(activation_taps(f"{name}.{blocks - 1}.out_relu")
                                for name, blocks in zip(self.stage_names, blocks_per_stage))

    def forward(self, images):
        x = self.relu(self.bn1(self.conv1(images)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return getattr(self, self.head_name)(self.flatten(self.avgpool(x)))


BASIC_FILTERS = [16, 16, 32, 64]  # stem, stage 1, 2, 3 (resnet.py's num_filters)
WIDE_FILTERS = [32, 64, 128, 256]  # the ×4 models
BASIC_MODELS = {  # name: (depth, filters)
    "resnet8": (8, BASIC_FILTERS), "resnet14": (14, BASIC_FILTERS), "resnet20": (20, BASIC_FILTERS),
    "resnet32": (32, BASIC_FILTERS), "resnet44": (44, BASIC_FILTERS), "resnet56": (56, BASIC_FILTERS),
    "resnet110": (110, BASIC_FILTERS), "resnet8x4": (8, WIDE_FILTERS), "resnet32x4": (32, WIDE_FILTERS),
}


def basic_resnet(depth: int, filters: list[int], num_classes: int, in_channels: int = 3) -> CifarResNet:
    """A CIFAR BasicBlock ResNet of depth 6n + 2 (resnet.py's ResNet)."""
    blocks = (depth - 2) // 6
    net = CifarResNet(BasicBlock, filters[0], filters[1:], [blocks] * 3, num_classes, in_channels, head_name="fc")
    init_like_reference(net, linear="pytorch")
    return net


@attrs.define
class BlocksParams:
    blocks: list[int] = stage_blocks_field([3, 3, 3], "basic block", [9, 9, 5], "resnet20")


def resnet50(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """resnetv2.py's ResNet50 (CIFAR stem)."""
    net = CifarResNet(Bottleneck, 64, [64, 128, 256, 512], [3, 4, 6, 3], num_classes, in_channels, head_name="linear")
    init_like_reference(net, linear="pytorch")
    return net


def _basic_builder(depth: int, filters: list[int]):
    return lambda params, num_classes, input_shape: basic_resnet(depth, filters, num_classes, input_shape[0])


def _describe(name: str, depth: int, filters: list[int]) -> str:
    blocks = (depth - 2) // 6
    plural = "s" if blocks > 1 else ""
    return (f"CIFAR ResNet-{depth}{'x4' if filters is WIDE_FILTERS else ''}: 3 stages × {blocks} basic block{plural}, "
            f"{'/'.join(map(str, filters[1:]))} channels (CRD zoo)")


MODELS = {name: zoo_model_class(__name__, name, _describe(name, depth, filters), _basic_builder(depth, filters))
          for name, (depth, filters) in BASIC_MODELS.items()}
MODELS["resnet50"] = zoo_model_class(
    __name__, "resnet50", "CIFAR ResNet-50: bottleneck stages [3, 4, 6, 3], 256…2048 channels, 3×3 stem (CRD zoo)",
    lambda params, num_classes, input_shape: resnet50(num_classes, input_shape[0]))

MODELS["resnet_blocks"] = zoo_model_class(
    __name__, "resnet_blocks", "CIFAR ResNet with any basic blocks per stage, 16/32/64 channels (a Pyramid level between two depths)",
    lambda params, num_classes, input_shape: _blocks_resnet(params.blocks, num_classes, input_shape[0]), BlocksParams)


def _blocks_resnet(blocks: list[int], num_classes: int, in_channels: int) -> CifarResNet:
    net = CifarResNet(BasicBlock, BASIC_FILTERS[0], BASIC_FILTERS[1:], list(blocks), num_classes, in_channels, head_name="fc")
    init_like_reference(net, linear="pytorch")
    return net


# The Pyramid schemes' depth ladder (plugins/schemes/ladders.py reads it): levels largest
# first with their blocks per stage. Every level has the same stem, stage widths and head,
# so a smaller level is the larger with blocks dropped; `resnet_blocks` builds the levels
# in between, where only some stages are shortened yet.
PYRAMID_LADDER = {
    "family": "CIFAR ResNet",
    "levels": {name: [(BASIC_MODELS[name][0] - 2) // 6] * 3 for name in ("resnet110", "resnet56", "resnet32", "resnet20", "resnet8")},
    "in_between": ("resnet_blocks", {}),
    "stem": ("conv1", "bn1"),
    "stages": ("layer1", "layer2", "layer3"),
}


@hookimpl
def pyramidkd_register_models():
    return list(MODELS.values())
