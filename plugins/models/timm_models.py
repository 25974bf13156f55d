"""``timm``: any model of PyTorch Image Models by name (optional extra ``pyramidkd[timm]``).

    model = { name = "timm", arch = "resnet18", pretrained = false }

``timm.create_model(arch, pretrained=..., num_classes=<the data set's>,
in_chans=<its channels>)``: ``arch`` is any name of ``timm.list_models()``, optionally
with a pretrained tag (``resnet18.a1_in1k``); ``pretrained = true`` downloads timm's
weights (Hugging Face hub cache) and keeps the body, with a fresh head.

Tap points come from timm's own ``feature_info``: ``feat.0`` … ``feat.K`` are its
levels in order (each entry's ``module`` path; for most CNNs level 0 is the stem at
stride 2, for ConvNeXt-like models the first stage), and ``pooled`` is the input of
``get_classifier()`` (after timm's head dropout in training mode, for the archs that
have one). timm names no pre-activation points, so ``preact.k`` is not offered.
"""

from __future__ import annotations

import difflib

import attrs
import torch
from torch import nn

from pyramidkd.engine import FieldValueError, Model, UserError, hookimpl, install_hint
from pyramidkd.plugins.models.torchvision_taps import TapPoints

INSTALL_FIX = f"install it: {install_hint('timm')}"


def import_timm():
    try:
        import timm
    except ImportError:
        raise FieldValueError("the timm model plugin needs the timm package, which is not installed", INSTALL_FIX) from None
    return timm


def _check_arch(instance, attribute, value):
    timm = import_timm()
    if timm.is_model(value):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(value, names, n=3)
    hint = f"did you mean {' or '.join(repr(name) for name in close)}? " if close else ""
    raise FieldValueError(f"unknown timm arch {value!r}",
                          f"{hint}list the names with `python -c \"import timm; print(timm.list_models('resnet*'))\"`")


def _check_pretrained(arch: str, pretrained: bool) -> None:
    if not pretrained:
        return
    timm = import_timm()
    tags = timm.list_pretrained(arch if "." in arch else f"{arch}.*")
    if not tags:
        raise FieldValueError(f"pretrained = true: timm has no pretrained weights for {arch!r}",
                              "set pretrained = false, or choose an arch of timm.list_pretrained()")


@attrs.define
class TimmParams:
    arch: str = attrs.field(default="resnet18", validator=_check_arch, metadata={
        "help": "a timm model name, optionally with a pretrained tag: resnet18, resnet18.a1_in1k, mobilenetv3_small_050, ..."})
    pretrained: bool = attrs.field(default=False, metadata={
        "help": "load timm's pretrained weights (downloaded into the Hugging Face cache) and fit a fresh head"})

    def __attrs_post_init__(self):
        _check_pretrained(self.arch, self.pretrained)


def build_timm(params: TimmParams, num_classes: int, input_shape: tuple[int, int, int], load_weights: bool = True) -> nn.Module:
    """``timm.create_model`` with the data set's classes and channels, and tap points."""
    try:
        timm = import_timm()
    except FieldValueError as error:
        raise UserError(error.message, fix=error.fix) from None
    pretrained = params.pretrained and load_weights and torch.empty(()).device.type != "meta"
    model = timm.create_model(params.arch, pretrained=pretrained, num_classes=num_classes, in_chans=input_shape[0])
    model.tap_points = TapPoints(timm_tap_points(model))
    return model


def timm_tap_points(model: nn.Module) -> dict[str, str]:
    """feat.k from ``feature_info`` (paths that name a module), pooled = the classifier's input."""
    modules = dict(model.named_modules())
    levels = [info["module"] for info in getattr(model, "feature_info", []) if info.get("module") in modules]
    points = {f"feat.{index}": path for index, path in enumerate(levels)}
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, nn.Module):
        path = next((name for name, module in modules.items() if module is classifier and name), "")
        if path:
            points["pooled"] = f"{path}:input"
    return points


class TimmModel(Model):
    """Any timm model by name (pip install 'pyramidkd[timm]')."""

    name = "timm"
    description = "any timm model by name (arch = \"resnet18\", pretrained; needs the timm extra)"
    Params = TimmParams

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        return build_timm(self.params, num_classes, tuple(input_shape))

    def build_for_checkpoint(self, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        """The same architecture without downloading pretrained weights (a checkpoint's
        state dict replaces them)."""
        return build_timm(self.params, num_classes, tuple(input_shape), load_weights=False)


@hookimpl
def pyramidkd_register_models():
    return [TimmModel]
