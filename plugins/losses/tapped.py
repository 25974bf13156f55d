"""Shared pieces of the method-zoo losses that read the tap contract.

A zoo model's ``tap_points()`` names ``feat.0`` (stem), ``feat.1`` … ``feat.K``
(stage outputs after their activation), ``preact.1`` … ``preact.K`` and ``pooled``
(the classifier's input, [N, D]). A loss declares the taps it reads in ``taps``
(``"feat.*"``: every stage 1…K); the kd scheme taps them on both models and the
loss finds them in ``ModelOutput.features``.

:class:`FeatureTermLoss` is the common form of the feature losses, as in the
reference code bases (mdistiller's ``forward_train``, RepDistiller's
``train_student.py``): ``ce_weight · CE(student logits, y) + feat_weight · term``.
"""

from __future__ import annotations

import re
from typing import Sequence

import attrs
import torch
import torch.nn.functional as F

from pyramidkd.engine import Loss, ModelOutput, UserError, non_negative

_STAGE = re.compile(r"feat\.(\d+)")


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """float32, or float64 kept (reduced precision inputs are computed in float32)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def tap_error(loss: str, role: str, wanted: str, output: ModelOutput) -> UserError:
    have = ", ".join(sorted(output.features)) or "none"
    return UserError(
        f"loss {loss!r} needs the {role}'s tap {wanted!r}, but the stage tapped {have}",
        fix=f"train it with the kd scheme and a {role} model that declares tap_points() with {wanted!r} "
        "(the model zoo: resnet*, wrn_*, vgg*_bn, mobilenetv2, shufflenet*)",
    )


def stage_maps(output: ModelOutput, loss: str, role: str) -> list[torch.Tensor]:
    """The stage outputs ``feat.1`` … ``feat.K`` in stage order (``feat.0``, the stem, is not a stage)."""
    stages = sorted((int(m.group(1)), name) for name in output.features if (m := _STAGE.fullmatch(name)))
    maps = [output.features[name] for index, name in stages if index >= 1]
    if not maps:
        raise tap_error(loss, role, "feat.1", output)
    for tensor in maps:
        if tensor.dim() != 4:
            raise UserError(
                f"loss {loss!r}: the {role}'s stage outputs must be feature maps [N, C, H, W], got shape {tuple(tensor.shape)}",
                fix=f"use loss {loss!r} with a convolutional model",
            )
    return maps


def paired_stages(student: ModelOutput, teacher: ModelOutput, loss: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student, teacher) maps of stages 1 … min(K_s, K_t), paired by index as the
    references' ``zip(g_s, g_t)`` pairs them."""
    return list(zip(stage_maps(student, loss, "student"), stage_maps(teacher, loss, "teacher")))


def last_stage(output: ModelOutput, loss: str, role: str) -> torch.Tensor:
    """``feat.K``: the last stage's output."""
    return stage_maps(output, loss, role)[-1]


def pooled(output: ModelOutput, loss: str, role: str) -> torch.Tensor:
    """``pooled`` as [N, D] in float32 (float64 kept)."""
    if "pooled" not in output.features:
        raise tap_error(loss, role, "pooled", output)
    tensor = output.features["pooled"]
    return at_least_float32(tensor.reshape(tensor.shape[0], -1))


def one_teacher(teachers: Sequence[ModelOutput], loss: str) -> ModelOutput:
    if len(teachers) != 1:
        raise UserError(
            f"loss {loss!r} compares the student's features with one teacher's, but the stage has {len(teachers)} teachers",
            fix=f"use loss {loss!r} with the kd scheme (one teacher); for several teachers use a logit loss (kd, dkd, dist)",
        )
    return teachers[0]


def smaller_size(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    return min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])


def ce_weight_field():
    return attrs.field(default=1.0, validator=non_negative, metadata={"help": "weight of the cross-entropy term"})


def feat_weight_field(default: float):
    return attrs.field(default=default, validator=non_negative,
                       metadata={"help": f"weight of the method's own term (reference CIFAR-100 default {default:g})"})


class FeatureTermLoss(Loss):
    """``ce_weight · CE + feat_weight · feature_term(student, teacher)``; subclasses
    set ``taps`` and implement :meth:`feature_term` (float32, a scalar)."""

    needs_teacher = True

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> torch.Tensor:
        raise NotImplementedError

    def setup(self, student, teachers):
        # Runs once on a real batch before training: a missing tap or shapes that
        # cannot be matched are refused here, not at step one.
        self.feature_term(student, one_teacher(teachers, self.name))

    def forward(self, student, teachers, targets):
        term = self.feature_term(student, one_teacher(teachers, self.name))
        loss = self.params.feat_weight * term
        if self.params.ce_weight > 0:
            loss = loss + self.params.ce_weight * F.cross_entropy(at_least_float32(student.logits), targets)
        return loss
