"""ShuffleNet V1 and V2 for CIFAR as the KD zoo defines them (CRD's students;
RepDistiller models/ShuffleNetv1.py ``ShuffleV1`` and models/ShuffleNetv2.py
``ShuffleV2``, the same in mdistiller models/cifar/). Both start with a 1×1
conv-BN-ReLU to 24 channels at full resolution (no stride, no max-pool) and end
with global average pooling (the reference's ``avg_pool2d(·, 4)`` on the 4×4 map at
32×32) and one linear layer. Initialisation is PyTorch's default, as in the
references (they set none).

``shufflenetv1`` (Zhang et al. 2018), groups g = 3: stages of 4 / 8 / 4 bottlenecks
to 240 / 480 / 960 channels. A bottleneck: grouped 1×1 (to out/4; *not* grouped on
the 24-channel stem output) -BN-ReLU, channel shuffle, 3×3 depthwise (stride)-BN-ReLU,
grouped 1×1-BN; a stage's first block (stride 2) concatenates a 3×3 average-pooled
input (so it outputs out - in channels), the others add the input; then ReLU, the
block's ``out_relu`` module (``preact.k`` = its input). 0.95 M parameters at 100 classes.

``shufflenetv2`` (Ma et al. 2018), net size 1: stages of a down block + 3 / 7 / 3
basic blocks, 116 / 232 / 464 channels, then a 1×1 conv-BN-ReLU to 1024. A basic
block splits the channels in half, runs 1×1-BN-ReLU, 3×3 depthwise-BN, 1×1-BN on
one half, concatenates, ReLUs and shuffles (2 groups); ``preact.k`` is the concatenation
before the ReLU and ``feat.k`` the shuffled output, as the reference returns them.
1.36 M parameters at 100 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from pyramidkd.engine import hookimpl
from pyramidkd.plugins.models.zoo_common import TappedNet, activation_taps, global_pool, zoo_model_class

STEM_CHANNELS = 24


class ChannelShuffle(nn.Module):
    """[N, g·c, H, W] -> [N, c·g, H, W]: interleave the groups' channels."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def stem(in_channels: int) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.ReLU]:
    """The shared stem: conv1 (1×1 to 24), bn1, relu."""
    return nn.Conv2d(in_channels, STEM_CHANNELS, kernel_size=1, bias=False), nn.BatchNorm2d(STEM_CHANNELS), nn.ReLU(inplace=True)


class ShuffleV1Block(nn.Module):
    """ShuffleNet V1's bottleneck (ShuffleNetv1.py's Bottleneck; its attribute names)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        first_groups = 1 if in_planes == STEM_CHANNELS else groups  # as the paper: too few stem channels to group
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.out_relu = nn.ReLU()

    def forward(self, x):
        out = self.shuffle1(self.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        shortcut = self.shortcut(x)
        return self.out_relu(torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut)


class ShuffleNetV1(TappedNet):
    """conv1, bn1, relu -> layer1..3 -> avgpool -> flatten -> linear."""

    def __init__(self, out_planes: list[int], blocks: list[int], groups: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1, self.bn1, self.relu = stem(in_channels)
        in_planes = STEM_CHANNELS
        for index, (planes, count) in enumerate(zip(out_planes, blocks), start=1):
            layers = []
            for i in range(count):  # the first (stride 2) block concatenates its input: it adds planes - in_planes
                layers.append(ShuffleV1Block(in_planes, planes - in_planes if i == 0 else planes, 2 if i == 0 else 1, groups))
                in_planes = planes
            self.add_module(f"layer{index}", nn.Sequential(*layers))
        self.avgpool, self.flatten = global_pool()
        self.linear = nn.Linear(in_planes, num_classes)
        self.stem_tap = "relu"
        self.stage_taps = tuple(activation_taps(f"layer{k}.{count - 1}.out_relu") for k, count in enumerate(blocks, start=1))

    def forward(self, images):
        x = self.relu(self.bn1(self.conv1(images)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


class ShuffleV2Block(nn.Module):
    """ShuffleNet V2's basic block (ShuffleNetv2.py's BasicBlock, split ratio 1/2)."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, stride=1, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.out_relu = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        half = x.shape[1] // 2
        kept, processed = x[:, :half], x[:, half:]
        processed = self.bn3(self.conv3(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(processed)))))))
        # The reference ReLUs only the processed half; the kept half is a ReLU output
        # already (>= 0), so a ReLU over the concatenation is the same and exposes it.
        return self.shuffle(self.out_relu(torch.cat([kept, processed], 1)))


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 block: both branches process the whole input (ShuffleNetv2.py's DownBlock)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu(self.bn3(self.conv3(x)))))
        right = self.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(TappedNet):
    """conv1, bn1, relu -> layer1..3 -> conv2, bn2, head_relu -> avgpool -> flatten -> linear."""

    def __init__(self, out_channels: list[int], blocks: list[int], last_channels: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1, self.bn1, self.relu = stem(in_channels)
        channels = STEM_CHANNELS
        for index, (stage_channels, count) in enumerate(zip(out_channels, blocks), start=1):
            layers = [ShuffleV2DownBlock(channels, stage_channels)] + [ShuffleV2Block(stage_channels) for _ in range(count)]
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            channels = stage_channels
        self.conv2 = nn.Conv2d(channels, last_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.head_relu = nn.ReLU(inplace=True)
        self.avgpool, self.flatten = global_pool()
        self.linear = nn.Linear(last_channels, num_classes)
        self.stem_tap = "relu"
        self.stage_taps = tuple((f"layer{k}.{count}.shuffle", f"layer{k}.{count}.out_relu:input")
                                for k, count in enumerate(blocks, start=1))

    def forward(self, images):
        x = self.relu(self.bn1(self.conv1(images)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.head_relu(self.bn2(self.conv2(x)))
        return self.linear(self.flatten(self.avgpool(x)))


MODELS = {
    "shufflenetv1": zoo_model_class(
        __name__, "shufflenetv1", "ShuffleNet V1 for CIFAR, 3 groups, 240/480/960 channels (the CRD zoo's ShuffleV1)",
        lambda params, num_classes, input_shape: ShuffleNetV1([240, 480, 960], [4, 8, 4], 3, num_classes, input_shape[0])),
    "shufflenetv2": zoo_model_class(
        __name__, "shufflenetv2", "ShuffleNet V2 for CIFAR, net size 1, 116/232/464 channels (the CRD zoo's ShuffleV2)",
        lambda params, num_classes, input_shape: ShuffleNetV2([116, 232, 464], [3, 7, 3], 1024, num_classes, input_shape[0])),
}


@hookimpl
def pyramidkd_register_models():
    return list(MODELS.values())
