"""Tap points and the small-input stem of torchvision classification models.

Which family gives which points (the tap contract of :mod:`zoo_common`)::

    family                              feat.0 (stem)     feat.k / preact.k            K  small_input
    resnet*, resnext*, wide_resnet*     maxpool           layer{k}; last block's        4  3×3 s1 conv1, no max-pool
                                                          out_relu:input
    regnet_*                            stem              trunk_output.block{k}; last   4  stem conv stride 1
                                                          block's activation:input
    densenet*                           features.pool0    transition{k}.relu (k < 4),   4  3×3 s1 conv0, no pool0
                                                          final_relu (k = 4); :input
    vgg*                                features.<relu>   block k's last ReLU; :input   4  no (no stem stride)
    mobilenet_v2, mobilenet_v3_*,       features.0        features.<last of a           4-5 stem conv stride 1
    efficientnet_*                                        resolution>; linear stages:
                                                          preact = feat, the final
                                                          1×1 conv: its activation
    convnext_*                          features.0        features.1/3/5/7; preact =    4  no (4×4 patchify stem)
                                                          feat (no activation)
    every other arch                    —                 —                             —  no

``pooled`` is the vector the final linear layer sees, taken before the dropout that
precedes it (``fc:input``, ``classifier.5:input`` for VGG, ``classifier.0:input``
for EfficientNet …), for every arch with a linear head (not SqueezeNet, whose head
is a convolution). A point a family does not list is absent from ``tap_points()``.

torchvision's ResNet blocks apply one in-place ReLU module three times, so the
pre-activation cannot be recorded from it: the last block of each stage becomes a
subclass whose forward ends in a separate, non-inplace ``out_relu`` module (the same
arithmetic). Tapped activations are made non-inplace likewise. None of this adds or
renames a parameter or buffer, so pretrained state dicts load unchanged.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU)

# Family by the arch name's prefix (known before building, for the recipe check).
FAMILY_PREFIXES = {
    "resnet": "resnet", "resnext": "resnet", "wide_resnet": "resnet", "regnet_": "regnet", "densenet": "densenet",
    "vgg": "vgg", "mobilenet_v2": "mobilenet", "mobilenet_v3": "mobilenet", "efficientnet_": "efficientnet",
    "convnext_": "convnext",
}
SMALL_INPUT_FAMILIES = {"resnet": "ResNet / ResNeXt / Wide ResNet", "regnet": "RegNet", "densenet": "DenseNet",
                        "mobilenet": "MobileNetV2 / V3", "efficientnet": "EfficientNet (V1 and V2)"}


def family_of(arch: str) -> str:
    """The tap family of a torchvision arch name ("" when it has none)."""
    return next((family for prefix, family in FAMILY_PREFIXES.items() if arch.startswith(prefix)), "")


class TapPoints:
    """``model.tap_points()`` for a model class we do not own (picklable, unlike a lambda)."""

    def __init__(self, points: dict[str, str]):
        self.points = dict(points)

    def __call__(self) -> dict[str, str]:
        return dict(self.points)


# --- blocks with a separate final activation -----------------------------------


class TappedBasicBlock(BasicBlock):
    """torchvision's BasicBlock, its final ReLU the separate module ``out_relu``."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.out_relu(out + identity)


class TappedBottleneck(Bottleneck):
    """torchvision's Bottleneck, its final ReLU the separate module ``out_relu``."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.out_relu(self.bn3(self.conv3(out)) + identity)


class TappedDenseNet(models.DenseNet):
    """torchvision's DenseNet with its functional final ReLU as the module ``final_relu``."""

    def forward(self, x):
        out = self.final_relu(self.features(x))
        return self.classifier(F.adaptive_avg_pool2d(out, (1, 1)).flatten(1))


# --- the small-input stem --------------------------------------------------------


def small_input_stem(model: nn.Module, family: str) -> None:
    """Swap the ImageNet stem for a 32×32-friendly one (stride 1, no max-pool)."""
    if family == "resnet":
        model.conv1 = _stem_conv(model.conv1)
        model.maxpool = nn.Identity()
    elif family == "densenet":
        model.features.conv0 = _stem_conv(model.features.conv0)
        model.features.pool0 = nn.Identity()
    elif family == "regnet":
        model.stem[0].stride = (1, 1)  # already 3×3: pretrained weights still fit
    elif family in ("mobilenet", "efficientnet"):
        model.features[0][0].stride = (1, 1)
    else:
        raise ValueError(f"no small-input stem for family {family!r}")


def _stem_conv(old: nn.Conv2d) -> nn.Conv2d:
    conv = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's ResNet inits convs
    return conv


# --- tap points by family ----------------------------------------------------------


def install_taps(model: nn.Module, family: str) -> dict[str, str]:
    """Prepare ``model`` for tapping and return its tap points (family's + ``pooled``)."""
    builders = {"resnet": _resnet_taps, "regnet": _regnet_taps, "densenet": _densenet_taps, "vgg": _vgg_taps,
                "mobilenet": _features_taps, "efficientnet": _features_taps, "convnext": _features_taps}
    points = builders[family](model) if family in builders else {}
    pooled = pooled_tap(model)
    if pooled:
        points["pooled"] = pooled
    model.tap_points = TapPoints(_contract_order(points))
    return points


def _contract_order(points: dict[str, str]) -> dict[str, str]:
    """feat.0 … feat.K, preact.1 … preact.K, pooled (the zoo's order)."""
    feats = sorted((k for k in points if k.startswith("feat.")), key=lambda k: int(k.split(".")[1]))
    preacts = sorted((k for k in points if k.startswith("preact.")), key=lambda k: int(k.split(".")[1]))
    return {key: points[key] for key in [*feats, *preacts, *(["pooled"] if "pooled" in points else [])]}


def _stages(feats: list[str], preacts: list[str], stem: str) -> dict[str, str]:
    points = {"feat.0": stem}
    for index, (feat, preact) in enumerate(zip(feats, preacts), start=1):
        points[f"feat.{index}"], points[f"preact.{index}"] = feat, preact
    return points


def _resnet_taps(model: nn.Module) -> dict[str, str]:
    feats, preacts = [], []
    for index in range(1, 5):
        stage = getattr(model, f"layer{index}")
        last = stage[-1]
        last.__class__ = TappedBasicBlock if isinstance(last, BasicBlock) else TappedBottleneck
        last.out_relu = nn.ReLU()
        feats.append(f"layer{index}")
        preacts.append(f"layer{index}.{len(stage) - 1}.out_relu:input")
    return _stages(feats, preacts, "maxpool")


def _regnet_taps(model: nn.Module) -> dict[str, str]:
    feats, preacts = [], []
    for stage_name, stage in model.trunk_output.named_children():
        block_name, block = list(stage.named_children())[-1]
        block.activation.inplace = False
        feats.append(f"trunk_output.{stage_name}")
        preacts.append(f"trunk_output.{stage_name}.{block_name}.activation:input")
    return _stages(feats, preacts, "stem")


def _densenet_taps(model: nn.Module) -> dict[str, str]:
    model.__class__ = TappedDenseNet
    model.final_relu = nn.ReLU()
    transitions = [name for name, _ in model.features.named_children() if name.startswith("transition")]
    for name in transitions:
        getattr(model.features, name).relu.inplace = False
    feats = [f"features.{name}.relu" for name in transitions] + ["final_relu"]
    return _stages(feats, [f"{feat}:input" for feat in feats], "features.pool0")


def _vgg_taps(model: nn.Module) -> dict[str, str]:
    layers = list(model.features)
    block_ends = [index - 1 for index, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
    for index in block_ends:
        layers[index].inplace = False
    feats = [f"features.{index}" for index in block_ends]
    return _stages(feats[1:], [f"{feat}:input" for feat in feats[1:]], feats[0])


def _features_taps(model: nn.Module) -> dict[str, str]:
    """A ``features`` sequential: the stem first, then one stage per resolution."""
    layers = list(model.features)
    groups: list[list[int]] = []
    for index in range(1, len(layers)):
        if not groups or _downsamples(layers[index]):
            groups.append([])
        groups[-1].append(index)
    feats, preacts = [], []
    for group in groups:
        last = layers[group[-1]]
        feat = f"features.{group[-1]}"
        activation = last[-1] if isinstance(last, nn.Sequential) and isinstance(last[-1], ACTIVATIONS) else None
        if activation is not None:  # the final 1×1 conv-BN-activation
            activation.inplace = False
            preacts.append(f"{feat}.{len(last) - 1}:input")
        else:  # a linear bottleneck / ConvNeXt block: no activation follows
            preacts.append(feat)
        feats.append(feat)
    return _stages(feats, preacts, "features.0")


def _downsamples(module: nn.Module) -> bool:
    for sub in module.modules():
        if isinstance(sub, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            stride = sub.stride if isinstance(sub.stride, tuple) else (sub.stride,)
            if max(stride) > 1:
                return True
    return False


# --- the head ------------------------------------------------------------------------


def head_path(model: nn.Module, num_classes: int) -> str:
    """Path of the layer producing the logits: the last Linear (or, for SqueezeNet,
    the 1×1 conv) with ``num_classes`` outputs."""
    found = ""
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) and module.out_features == num_classes) or \
                (isinstance(module, nn.Conv2d) and module.out_channels == num_classes and name.startswith("classifier")):
            found = name
    return found


def replace_head(model: nn.Module, num_classes: int, pretrained_classes: int) -> None:
    """A fresh head of ``num_classes`` outputs in place of the pretrained one."""
    path = head_path(model, pretrained_classes)
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, child)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size)
    setattr(parent, child, new)


def pooled_tap(model: nn.Module) -> str:
    """The final Linear's input, before the dropout(s) just ahead of it ("" if none)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        return ""
    path = linears[-1]
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if not isinstance(parent, nn.Sequential):
        return f"{path}:input"
    names = [name for name, _ in parent.named_children()]
    start = names.index(child)
    while start > 0 and isinstance(parent[start - 1], nn.Dropout):
        start -= 1
        parent[start].inplace = False  # an in-place dropout would overwrite the recorded input
    return f"{parent_path}.{names[start]}:input"


def adapt_first_conv(model: nn.Module, channels: int, pretrained: bool) -> None:
    """Give the first convolution ``channels`` input channels instead of 3. Pretrained
    RGB filters are summed (one channel) or tiled and rescaled (timm's rule), random
    ones sliced or tiled (their per-element distribution is kept)."""
    path, conv = next((name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d))
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, bias=conv.bias is not None)
    weight = conv.weight.detach()
    if pretrained and channels == 1:
        weight = weight.sum(dim=1, keepdim=True)
    else:
        repeats = -(-channels // weight.shape[1])
        weight = weight.repeat(1, repeats, 1, 1)[:, :channels]
        if pretrained:
            weight = weight * (3 / channels)
    new.weight.data.copy_(weight)
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.detach())
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
