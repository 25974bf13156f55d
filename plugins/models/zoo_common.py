"""Shared pieces of the standard knowledge-distillation model zoo (CIFAR ResNets,
Wide ResNets, VGG-BN, MobileNetV2, ShuffleNet V1/V2 — the CRD code base
"RepDistiller" and mdistiller define them; each module cites its reference file).

* The tap contract: every zoo network is a :class:`TappedNet` whose
  ``tap_points()`` names ``feat.0`` (stem output), ``feat.1`` … ``feat.K`` (stage
  outputs after the activation), ``preact.1`` … ``preact.K`` (the same before that
  activation) and ``pooled`` ([N, D], the classifier's input) as TapRecorder specs:
  a ``named_modules()`` path, with ``:input`` for the module's input. A stage's
  final activation is therefore a separate, non-inplace module (an in-place one
  would overwrite the recorded pre-activation), and pooling ends in ``nn.Flatten``.
* The references' initialisation (:func:`init_like_reference`).
* :func:`zoo_model_class`: a registered ``Model`` class from a name and a builder.

Parameter-holding modules keep the references' attribute names, so a state dict
saved by RepDistiller / mdistiller has the same keys as ours.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import attrs
from torch import nn

from pyramidkd.engine import FieldValueError, Model, NoParams


def stage_blocks_field(default: list[int], block: str, example: list[int], reference: str):
    """The ``blocks`` parameter of a 3-stage ResNet: 1 or more ``block``s in each stage."""

    def check(instance, attribute, value):
        if len(value) != 3 or min(value) < 1:
            raise FieldValueError(f"blocks must list 3 stages of 1 or more {block}s, got {value}", f"e.g. blocks = {example}")

    return attrs.field(factory=lambda: list(default), validator=check, metadata={
        "help": f"{block}s in each of the 3 stages, e.g. {example} ({reference} = {default})"})


class TappedNet(nn.Module):
    """A network that declares its tap points; subclasses set the three specs."""

    stem_tap: str = ""
    stage_taps: tuple[tuple[str, str], ...] = ()  # (feat spec, preact spec) per stage, input side first
    pooled_tap: str = "flatten"

    def tap_points(self) -> dict[str, str]:
        """Tap name -> TapRecorder spec (module path, optionally ``:input``)."""
        points = {"feat.0": self.stem_tap}
        for index, (feat, _) in enumerate(self.stage_taps, start=1):
            points[f"feat.{index}"] = feat
        for index, (_, preact) in enumerate(self.stage_taps, start=1):
            points[f"preact.{index}"] = preact
        points["pooled"] = self.pooled_tap
        return points


def activation_taps(activation_path: str) -> tuple[str, str]:
    """(feat, preact) specs of a stage that ends in the activation module at ``activation_path``."""
    return activation_path, f"{activation_path}:input"


def global_pool() -> tuple[nn.Module, nn.Module]:
    """Global average pooling + flatten. At 32×32 it equals the references' fixed
    ``AvgPool2d(k)`` on the last (k×k) map; it also lets larger images through."""
    return nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(1)


LinearInit = Literal["pytorch", "zero_bias", "normal"]


def init_like_reference(model: nn.Module, linear: LinearInit = "pytorch") -> None:
    """Kaiming normal (fan-out, ReLU) convs with zero bias, BN weight 1 / bias 0, as
    the references do; their linear layers differ: ``pytorch`` keeps PyTorch's default
    (resnet.py, resnetv2.py), ``zero_bias`` zeroes only the bias (wrn.py), ``normal``
    draws N(0, 0.01) with zero bias (vgg.py, mobilenetv2.py). The references' own
    N(0, sqrt(2 / (k·k·out))) is exactly Kaiming normal fan-out."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear != "pytorch":
            if linear == "normal":
                nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


NetBuilder = Callable[[Any, int, tuple[int, int, int]], nn.Module]  # (params, num_classes, input_shape) -> net


def zoo_model_class(module: str, name: str, description: str, build_net: NetBuilder, params: type = NoParams) -> type[Model]:
    """A ``Model`` subclass named ``name`` (defined in plugin ``module``) whose ``build`` calls ``build_net``."""

    def build(self, num_classes, input_shape):
        return build_net(self.params, num_classes, tuple(input_shape))

    attributes = {"name": name, "description": description, "__doc__": description, "Params": params,
                  "build": build, "__module__": module}
    class_name = "".join(part.capitalize() for part in name.split("_")) + "Model"
    return type(class_name, (Model,), attributes)
