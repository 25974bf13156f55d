"""MobileNetV2 for CIFAR as the KD zoo defines it (Sandler et al. 2018; RepDistiller
models/mobilenetv2.py ``mobile_half`` = ``mobilenetv2_T_w(6, 0.5)``, from "Knowledge
Distillation via Route Constrained Optimization"; mdistiller models/cifar/mobilenetv2.py).

A 3×3 stride-2 conv-BN-ReLU stem of int(32·w) channels, seven groups of inverted
residuals (t, c, n, s)::

    (1, 16, 1, 1) (T, 24, 2, 1) (T, 32, 3, 2) (T, 64, 4, 2) (T, 96, 3, 1) (T, 160, 3, 2) (T, 320, 1, 1)

with int(c·w) channels (a block: 1×1 expand-BN-ReLU, 3×3 depthwise-BN-ReLU, 1×1
linear projection-BN, + input when the shape is kept), a 1×1 conv-BN-ReLU to 1280
channels (int(1280·w) only for w > 1), global average pooling, one linear layer.
At width 0.5, T = 6: 0.81 M parameters at 100 classes.

Taps follow the reference's features: ``feat.0`` = the stem, stages = the outputs of
block groups 1, 2, 4 and 6 (12 / 16 / 48 / 160 channels at 16 / 8 / 4 / 2 px for a
32×32 input). Those are linear bottlenecks: no activation follows them, so
``preact.k`` is the same tensor as ``feat.k`` (the reference's
``get_bn_before_relu`` names the same BNs). Global pooling replaces the reference's
``AvgPool2d(2, ceil_mode=True)`` (the same at 32×32; it lets other sizes through).
"""

from __future__ import annotations

import attrs
from torch import nn

from pyramidkd.engine import UserError, hookimpl, positive
from pyramidkd.plugins.models.zoo_common import TappedNet, global_pool, init_like_reference, zoo_model_class

STEM_CHANNELS, LAST_CHANNELS = 32, 1280
# (t, c, n, s): expansion (None = the model's T), channels, blocks, first stride
GROUPS = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]
STAGE_GROUPS = (1, 2, 4, 6)  # the block groups whose outputs are the reference's features f1..f4


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1×1), depthwise (3×3, stride), project (1×1, linear); ``conv`` holds them (the reference's keys)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(TappedNet):
    """conv1 -> blocks[0..6] -> conv2 -> avgpool -> flatten -> classifier."""

    def __init__(self, expand_ratio: int, width_mult: float, num_classes: int, in_channels: int = 3):
        super().__init__()
        channels = int(STEM_CHANNELS * width_mult)
        self.conv1 = conv_bn_relu(in_channels, channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in GROUPS:
            out_channels = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(channels, out_channels, stride, t or expand_ratio))
                channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        last_channels = int(LAST_CHANNELS * width_mult) if width_mult > 1.0 else LAST_CHANNELS
        self.conv2 = conv_bn_relu(channels, last_channels, 1, 1)
        self.avgpool, self.flatten = global_pool()
        self.classifier = nn.Sequential(nn.Linear(last_channels, num_classes))
        self.stem_tap = "conv1"
        self.stage_taps = tuple((f"blocks.{group}", f"blocks.{group}") for group in STAGE_GROUPS)

    def forward(self, images):
        x = self.conv1(images)
        for group in self.blocks:
            x = group(x)
        return self.classifier(self.flatten(self.avgpool(self.conv2(x))))


def mobilenet_v2(expand_ratio: int, width_mult: float, num_classes: int, in_channels: int = 3) -> MobileNetV2:
    narrowest = min(c for _, c, _, _ in GROUPS)
    if int(narrowest * width_mult) < 1:
        raise UserError(f"model 'mobilenetv2': width_mult {width_mult:g} leaves the {narrowest}-channel blocks with no channels",
                        fix=f"set width_mult to at least {1 / narrowest:g}")
    net = MobileNetV2(expand_ratio, width_mult, num_classes, in_channels)
    init_like_reference(net, linear="normal")
    return net


@attrs.define
class MobileNetV2Params:
    expand_ratio: int = attrs.field(default=6, validator=positive, metadata={"help": "expansion T of the inverted residuals"})
    width_mult: float = attrs.field(default=0.5, validator=positive, metadata={"help": "channel multiplier (0.5: the zoo's mobile_half)"})


MobileNetV2Model = zoo_model_class(
    __name__, "mobilenetv2", "MobileNetV2 for CIFAR, T = 6, width 0.5 (the CRD zoo's mobile_half)",
    lambda params, num_classes, input_shape: mobilenet_v2(params.expand_ratio, params.width_mult, num_classes, input_shape[0]),
    MobileNetV2Params)


@hookimpl
def pyramidkd_register_models():
    return [MobileNetV2Model]
