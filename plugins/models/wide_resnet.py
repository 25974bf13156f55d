"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016; the KD zoo's definition:
RepDistiller models/wrn.py, mdistiller models/cifar/wrn.py).

WRN-d-k: a 3×3 conv to 16 channels, three stages of n = (d - 4) / 6 pre-activation
blocks (BN-ReLU-conv3×3-BN-ReLU-[dropout]-conv3×3) of 16k / 32k / 64k channels,
strides 1 / 2 / 2, then BN-ReLU, global average pooling and one linear layer. A block
that changes the channel count applies its BN-ReLU to the input first and adds it
through a bias-free 1×1 conv (``convShortcut``, no BN); otherwise the shortcut is
the raw input.

Taps: being pre-activation, a stage's output is activated by the next stage's first
block (``block{k+1}.layer.0.bn1`` / ``relu1``) and the last stage's by the final
``bn1`` / ``relu``; those are the stage's ``preact`` (RepDistiller's preact features,
its ``get_bn_before_relu``) and ``feat``, so those ReLUs are not in-place.
``feat.0`` is the stem conv's output.

Named models: ``wrn_16_1``, ``wrn_16_2``, ``wrn_28_2``, ``wrn_40_1``, ``wrn_40_2``; any depth
and width through ``wrn`` (e.g. ``{ name = "wrn", depth = 22, widen_factor = 4 }``), and any
blocks per stage through ``wrn_blocks`` (``blocks = [6, 6, 4]``: a level of the Pyramid's
ladder wrn_40_2 → wrn_28_2 → wrn_16_2 on the way from one depth to the next).
"""

from __future__ import annotations

import attrs
from torch import nn

from pyramidkd.engine import FieldValueError, between, hookimpl, positive
from pyramidkd.plugins.models.zoo_common import (
    TappedNet, activation_taps, global_pool, init_like_reference, stage_blocks_field, zoo_model_class,
)


class WideBlock(nn.Module):
    """A pre-activation basic block (wrn.py's BasicBlock; its attribute names)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.equal_in_out = in_planes == out_planes
        self.bn1 = nn.BatchNorm2d(in_planes)
        # A shape-changing block is a stage's first: its bn1 output is a tapped preact.
        self.relu1 = nn.ReLU(inplace=self.equal_in_out)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
        self.convShortcut = shortcut  # the reference's name, so its checkpoints' keys match

    def forward(self, x):
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(activated)))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class WideStage(nn.Module):
    """n blocks, the first with the stride (wrn.py's NetworkBlock: blocks under ``layer``)."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(*(WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout)
                                     for i in range(blocks)))

    def forward(self, x):
        return self.layer(x)


class WideResNet(TappedNet):
    """conv1 -> block1, block2, block3 -> bn1 -> relu -> avgpool -> flatten -> fc."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, dropout: float = 0.0, in_channels: int = 3,
                 stage_blocks: list[int] | None = None):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        blocks = list(stage_blocks) if stage_blocks else [(depth - 4) // 6] * 3  # per stage
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideStage(blocks[0], channels[0], channels[1], 1, dropout)
        self.block2 = WideStage(blocks[1], channels[1], channels[2], 2, dropout)
        self.block3 = WideStage(blocks[2], channels[2], channels[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.avgpool, self.flatten = global_pool()
        self.fc = nn.Linear(channels[3], num_classes)
        self.stem_tap = "conv1"
        self.stage_taps = (activation_taps("block2.layer.0.relu1"), activation_taps("block3.layer.0.relu1"), activation_taps("relu"))

    def forward(self, images):
        x = self.block3(self.block2(self.block1(self.conv1(images))))
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn1(x)))))


def wide_resnet(depth: int, widen_factor: int, num_classes: int, dropout: float = 0.0, in_channels: int = 3,
                stage_blocks: list[int] | None = None) -> WideResNet:
    net = WideResNet(depth, widen_factor, num_classes, dropout, in_channels, stage_blocks)
    init_like_reference(net, linear="zero_bias")
    return net


def _check_depth(instance, attribute, value):
    if value < 10 or (value - 4) % 6:
        lower = max(10, value - (value - 4) % 6)
        raise FieldValueError(f"a Wide ResNet's depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, …), got {value}",
                              f"set depth to {lower} or {lower + 6}")


def _dropout_field():
    return attrs.field(default=0.0, validator=between(0.0, 1.0), metadata={"help": "dropout between each block's two convs (the reference's dropRate)"})


@attrs.define
class WideResNetParams:
    depth: int = attrs.field(default=16, validator=_check_depth, metadata={"help": "6n + 4: 16, 22, 28, 40, ..."})
    widen_factor: int = attrs.field(default=2, validator=positive, metadata={"help": "channel multiplier k: 16k / 32k / 64k"})
    dropout: float = _dropout_field()


@attrs.define
class BlocksWideResNetParams:
    blocks: list[int] = stage_blocks_field([2, 2, 2], "block", [6, 6, 4], "wrn_16_k")
    widen_factor: int = attrs.field(default=2, validator=positive, metadata={"help": "channel multiplier k: 16k / 32k / 64k"})
    dropout: float = _dropout_field()


@attrs.define
class NamedWideResNetParams:
    dropout: float = _dropout_field()


NAMED = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_28_2": (28, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}


def _named_builder(depth: int, widen_factor: int):
    return lambda params, num_classes, input_shape: wide_resnet(depth, widen_factor, num_classes, params.dropout, input_shape[0])


MODELS = {name: zoo_model_class(__name__, name, f"WRN-{depth}-{k}: Wide ResNet, 3 stages × {(depth - 4) // 6} blocks, "
                                f"{16 * k}/{32 * k}/{64 * k} channels (CRD zoo)", _named_builder(depth, k), NamedWideResNetParams)
          for name, (depth, k) in NAMED.items()}
MODELS["wrn"] = zoo_model_class(
    __name__, "wrn", "Wide ResNet WRN-depth-widen_factor (CRD zoo definition; e.g. depth 28, widen_factor 2)",
    lambda params, num_classes, input_shape: wide_resnet(params.depth, params.widen_factor, num_classes, params.dropout, input_shape[0]),
    WideResNetParams)
MODELS["wrn_blocks"] = zoo_model_class(
    __name__, "wrn_blocks", "Wide ResNet with any blocks per stage (a Pyramid level between two depths)",
    lambda params, num_classes, input_shape: wide_resnet(6 * sum(params.blocks) // 3 + 4, params.widen_factor, num_classes,
                                                         params.dropout, input_shape[0], params.blocks),  # depth: nominal
    BlocksWideResNetParams)

# The Pyramid schemes' depth ladder (plugins/schemes/ladders.py reads it): levels largest
# first with their blocks per stage. Every level has the same stem, widths and head, so a
# smaller level is the larger with blocks dropped; `wrn_blocks` builds the levels in
# between, where only some stages are shortened yet.
PYRAMID_LADDER = {
    "family": "WRN",
    "levels": {name: [(NAMED[name][0] - 4) // 6] * 3 for name in ("wrn_40_2", "wrn_28_2", "wrn_16_2")},
    "in_between": ("wrn_blocks", {"widen_factor": 2}),
    "stem": ("conv1",),
    "stages": ("block1", "block2", "block3"),
}


@hookimpl
def pyramidkd_register_models():
    return list(MODELS.values())
