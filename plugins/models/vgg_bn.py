"""CIFAR VGGs with batch norm and one linear head, as the KD zoo defines them
(RepDistiller models/vgg.py, mdistiller models/cifar/vgg.py): ``vgg8_bn`` …
``vgg19_bn``. Not the Pyramid's ``vgg19`` / ``svgg*`` nor the generic ``vgg``.

Five conv blocks (3×3 conv with bias, BN, ReLU; the block's last ReLU is a separate
non-inplace module ``relu{k}``, so ``preact.k`` is ``relu{k}:input``), a 2×2
max-pool after blocks 0-2, after block 3 only for 64×64 inputs (the reference
keeps 32×32 CIFAR at 4×4 for block 4), then global average pooling and
``Linear(512, classes)``. Block 0 is the stem (``feat.0``); blocks 1-4 are the
stages. Channels per block (``CONFIGS``)::

    vgg8_bn   [64] [128] [256] [512] [512]                       3.96 M at 100 classes
    vgg11_bn  [64] [128] [256 256] [512 512] [512 512]
    vgg13_bn  [64 64] [128 128] [256 256] [512 512] [512 512]    9.46 M
    vgg16_bn  … [256 ×3] [512 ×3] [512 ×3]
    vgg19_bn  … [256 ×4] [512 ×4] [512 ×4]
"""

from __future__ import annotations

from torch import nn

from pyramidkd.engine import hookimpl
from pyramidkd.plugins.models.vgg import feature_size
from pyramidkd.plugins.models.zoo_common import TappedNet, activation_taps, global_pool, init_like_reference, zoo_model_class

CONFIGS = {
    "vgg8_bn": [[64], [128], [256], [512], [512]],  # the reference's cfg "S"
    "vgg11_bn": [[64], [128], [256, 256], [512, 512], [512, 512]],  # "A"
    "vgg13_bn": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],  # "B"
    "vgg16_bn": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],  # "D"
    "vgg19_bn": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],  # "E"
}
POOL3_IMAGE_SIZE = 64  # the reference max-pools after block 3 only for inputs this high (Tiny-ImageNet)


def conv_block(channels: list[int], in_channels: int) -> nn.Sequential:
    """conv-BN-ReLU per entry, without the last ReLU (as the reference, so indices match its keys)."""
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        in_channels = out_channels
    return nn.Sequential(*layers[:-1])


class CifarVGG(TappedNet):
    """block{k} -> relu{k} (-> pool{k}) for k = 0..4, pool4 = global average pool -> flatten -> classifier."""

    def __init__(self, config: list[list[int]], num_classes: int, in_channels: int = 3):
        super().__init__()
        for index, channels in enumerate(config):
            self.add_module(f"block{index}", conv_block(channels, in_channels))
            in_channels = channels[-1]
        for index in range(len(config)):
            self.add_module(f"relu{index}", nn.ReLU())
        for index in range(len(config) - 1):
            self.add_module(f"pool{index}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4, self.flatten = global_pool()
        self.classifier = nn.Linear(in_channels, num_classes)
        self.stem_tap = "relu0"
        self.stage_taps = tuple(activation_taps(f"relu{index}") for index in range(1, len(config)))

    def forward(self, images):
        x = images
        for index in range(5):
            x = getattr(self, f"relu{index}")(getattr(self, f"block{index}")(x))
            if index < 3 or (index == 3 and images.shape[2] == POOL3_IMAGE_SIZE):
                x = getattr(self, f"pool{index}")(x)
        return self.classifier(self.flatten(self.pool4(x)))


def cifar_vgg(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> CifarVGG:
    pools = 4 if input_shape[1] == POOL3_IMAGE_SIZE else 3
    for size in input_shape[1:]:
        feature_size(size, pools, name)  # a UserError naming the smallest size that works
    net = CifarVGG(CONFIGS[name], num_classes, input_shape[0])
    init_like_reference(net, linear="normal")
    return net


def _builder(name: str):
    return lambda params, num_classes, input_shape: cifar_vgg(name, num_classes, input_shape)


def _describe(config: list[list[int]]) -> str:
    convs = sum(len(block) for block in config)
    return f"CIFAR VGG with BN: {convs} convs in 5 blocks, global pool, 1-FC head (CRD zoo)"


MODELS = {name: zoo_model_class(__name__, name, _describe(config), _builder(name)) for name, config in CONFIGS.items()}


@hookimpl
def pyramidkd_register_models():
    return list(MODELS.values())
