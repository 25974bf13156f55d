"""``torchvision``: any classification model torchvision lists, by name.

    model = { name = "torchvision", arch = "resnet18", weights = "IMAGENET1K_V1", small_input = true }

* ``arch``: a name of ``torchvision.models.list_models(module=torchvision.models)``
  (detection, segmentation, video and optical-flow models are refused).
* ``weights``: one of that arch's weights (``IMAGENET1K_V1``, ``DEFAULT`` …, or the
  full ``ResNet18_Weights.IMAGENET1K_V1``); torchvision downloads them into its own
  cache (``$TORCH_HOME``, by default ``~/.cache/torch``). Unset: random init, exactly
  torchvision's initialisation for ``num_classes`` outputs.
* The head always has the data set's class count: with ``weights`` the body is the
  pretrained one and the final layer (``fc`` / ``classifier[-1]`` / ``heads.head`` …)
  a fresh one. A data set with other than 3 channels gets its first convolution
  adapted (pretrained RGB filters summed for grey images).
* ``small_input = true``: a 3×3 stride-1 stem without the max-pool for 32×32 images
  (the CIFAR convention) — for the families of
  :data:`~pyramidkd.plugins.models.torchvision_taps.SMALL_INPUT_FAMILIES`.

Tap points by family: :mod:`pyramidkd.plugins.models.torchvision_taps`.
"""

from __future__ import annotations

import difflib
import functools

import attrs
import torch
from torch import nn

from pyramidkd.engine import FieldValueError, Model, hookimpl
from pyramidkd.plugins.models.torchvision_taps import (SMALL_INPUT_FAMILIES, adapt_first_conv, family_of, install_taps,
                                                       replace_head, small_input_stem)

AUX_HEAD_ARCHS = ("googlenet", "inception_v3")  # built without their auxiliary classifiers


@functools.lru_cache(maxsize=None)
def classification_archs() -> tuple[str, ...]:
    from torchvision import models

    return tuple(models.list_models(module=models))


def _check_arch(instance, attribute, value):
    from torchvision import models

    archs = classification_archs()
    if value in archs:
        return
    if value in models.list_models():
        raise FieldValueError(f"{value!r} is a torchvision model, but not an image classifier (detection, segmentation, "
                              "video or optical flow)", "choose a classification arch")
    close = difflib.get_close_matches(value, archs, n=3)
    hint = f"did you mean {' or '.join(repr(name) for name in close)}? " if close else ""
    raise FieldValueError(f"unknown torchvision arch {value!r}", f"{hint}use a classification arch: {', '.join(archs)}")


def weights_enum(arch: str):
    from torchvision.models import get_model_weights

    return get_model_weights(arch)


def _check_weights(arch: str, weights: str) -> None:
    if not weights:
        return
    enum = weights_enum(arch)
    valid = list(enum.__members__)
    owner, dot, member = weights.rpartition(".")
    if dot and owner != enum.__name__:
        holders = [name for name in classification_archs() if weights_enum(name).__name__ == owner]
        whose = f"those are {' / '.join(holders)}'s weights" if holders else f"{owner!r} is not a torchvision weights enum"
        raise FieldValueError(f"weights = {weights!r} do not belong to arch {arch!r}: {whose}",
                              f"use one of {arch}'s: {', '.join(valid)} (or leave weights unset for random init)")
    if member not in enum.__members__:
        holders = [name for name in classification_archs() if member in weights_enum(name).__members__]
        nearest = difflib.get_close_matches(arch, holders, n=3, cutoff=0)  # the arch's relatives first
        more = " …" if len(holders) > len(nearest) else ""
        elsewhere = f" (it is a weights name of {', '.join(nearest)}{more})" if holders else ""
        raise FieldValueError(f"arch {arch!r} has no weights {member!r}{elsewhere}",
                              f"use one of {arch}'s: {', '.join(valid)} (or leave weights unset for random init)")


def _check_small_input(arch: str, small_input: bool) -> None:
    if small_input and family_of(arch) not in SMALL_INPUT_FAMILIES:
        raise FieldValueError(f"small_input = true: torchvision arch {arch!r} has no small-input stem here",
                              "set small_input = false (or remove it), or use an arch of these families: "
                              + ", ".join(SMALL_INPUT_FAMILIES.values()))


@attrs.define
class TorchvisionParams:
    arch: str = attrs.field(default="resnet18", validator=_check_arch, metadata={
        "help": "a torchvision classifier, e.g. resnet18, mobilenet_v3_small, efficientnet_b0: "
                "torchvision.models.list_models(module=torchvision.models)"})
    weights: str = attrs.field(default="", metadata={
        "help": 'pretrained weights of that arch, e.g. "IMAGENET1K_V1" or "DEFAULT" (downloaded into torchvision\'s '
                'cache); unset: random init'})
    small_input: bool = attrs.field(default=False, metadata={
        "help": "a 3×3 stride-1 stem without the max-pool, for 32×32 images (ResNet, RegNet, DenseNet, MobileNet, EfficientNet)"})

    def __attrs_post_init__(self):
        _check_weights(self.arch, self.weights)
        _check_small_input(self.arch, self.small_input)


def _building_on_meta() -> bool:
    """Whether modules are being created on the meta device (shapes only: no download)."""
    return torch.empty(()).device.type == "meta"


def build_torchvision(params: TorchvisionParams, num_classes: int, input_shape: tuple[int, int, int],
                      load_weights: bool = True) -> nn.Module:
    """The model ``params`` name, with a ``num_classes`` head, tap points and, when
    ``load_weights`` (and not on the meta device), the pretrained weights."""
    from torchvision.models import get_model

    pretrained = bool(params.weights) and load_weights and not _building_on_meta()
    if pretrained:
        weights = weights_enum(params.arch).verify(params.weights)
        model = get_model(params.arch, weights=weights)
        _drop_aux_heads(model)
        replace_head(model, num_classes, len(weights.meta["categories"]))
    else:
        model = get_model(params.arch, num_classes=num_classes, **_random_init_options(params))
    family = family_of(params.arch)
    if input_shape[0] != 3:  # before the stem swap: a fresh small-input conv then gets these channels directly
        adapt_first_conv(model, input_shape[0], pretrained)
    if params.small_input:
        small_input_stem(model, family)
    install_taps(model, family)
    return model


def _random_init_options(params: TorchvisionParams) -> dict:
    if params.arch not in AUX_HEAD_ARCHS:
        return {}
    # transform_input as the pretrained build sets it, so a checkpoint rebuilds the same forward.
    return {"aux_logits": False, "init_weights": True, "transform_input": bool(params.weights)}


def _drop_aux_heads(model: nn.Module) -> None:
    """GoogLeNet / Inception v3 load with auxiliary heads; drop them as torchvision does."""
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, name):
                setattr(model, name, None)


class TorchvisionModel(Model):
    """Any torchvision classification model (arch, optional pretrained weights, small_input)."""

    name = "torchvision"
    description = "any torchvision classifier by name (arch = \"resnet18\", optional pretrained weights, small_input)"
    Params = TorchvisionParams

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        return build_torchvision(self.params, num_classes, tuple(input_shape))

    def build_for_checkpoint(self, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        """The same architecture without downloading pretrained weights: for loading a
        checkpoint's state dict, which replaces every weight anyway."""
        return build_torchvision(self.params, num_classes, tuple(input_shape), load_weights=False)


@hookimpl
def pyramidkd_register_models():
    return [TorchvisionModel]
