"""Feature-matching losses for hint stages, and the ensemble KD loss.

They read the tensors a scheme taps (``StagePlan.student_taps`` / ``teacher_taps``;
``ModelOutput.features`` maps tap name -> tensor) and compare the student with the
first teacher. Tap names:

* ``mse``  — ``out`` (or several: ``out.<k>``): the block output to match;
* ``gram`` — ``in`` and ``out`` (or pairs ``in.<k>`` / ``out.<k>``): the input and
  output of the block whose flow (FSP/Gram matrix) is matched;
* ``hint`` — ``hint``: FitNet's guided layer (student) and hint layer (teacher).

All are mean-reduced, so their scale does not depend on the batch or feature size.
``kd-ensemble`` uses logits only.
"""

from __future__ import annotations

from typing import Literal, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from pyramidkd.engine import Loss, ModelOutput, UserError, hookimpl, ops
from pyramidkd.plugins.losses.distillation import KDLoss, KDParams


def _pairs(features: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """Suffixes of the taps named ``prefix`` or ``prefix.<k>`` ("" for the plain one)."""
    return [name[len(prefix):] for name in features if name == prefix or name.startswith(prefix + ".")]


def _tap(output: ModelOutput, name: str, loss: str, role: str) -> torch.Tensor:
    try:
        return output.features[name]
    except KeyError:
        have = ", ".join(sorted(output.features)) or "none"
        raise UserError(
            f"loss {loss!r} needs the {role}'s tap {name!r}, but the stage taps {have}",
            fix=f"use loss {loss!r} with a scheme that taps {name!r} (pyramid-forward, pyramid-backward, gram-direct, fitnet)",
        ) from None


def _teacher(teachers: Sequence[ModelOutput], loss: str) -> ModelOutput:
    if not teachers:
        raise UserError(f"loss {loss!r} needs a teacher", fix="use it in a scheme that gives the stage a teacher")
    return teachers[0]


def _same_shape(student: torch.Tensor, teacher: torch.Tensor, loss: str, tap: str, what: str = "feature maps") -> None:
    if student.shape != teacher.shape:
        raise UserError(
            f"loss {loss!r}: the student's and the teacher's {what} at tap {tap!r} differ in shape: "
            f"student {tuple(student.shape[1:])} vs teacher {tuple(teacher.shape[1:])} (per sample)",
            fix="give the student the teacher's width and input size (mse and gram compare equal shapes), "
            'or use loss "hint", whose 1×1 regressor maps the student\'s channels to the teacher\'s',
        )


def _pool_to(tensor: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Adaptive pooling to ``size``, by ops whose backward is deterministic on CUDA
    (``adaptive_{avg,max}_pool2d``'s is not, so ``deterministic = true`` refuses it).

    When the sizes divide (every built-in scheme) it is plain pooling with the exact
    kernel, the same windows and values; otherwise the same windows as adaptive
    pooling, averaged by two matrix products or maxed window by window."""
    height, width = tensor.shape[-2:]
    if (height, width) == tuple(size):
        return tensor
    if height % size[0] == 0 and width % size[1] == 0:
        kernel = (height // size[0], width // size[1])
        return F.max_pool2d(tensor, kernel) if mode == "max" else F.avg_pool2d(tensor, kernel)
    rows, columns = _windows(height, size[0]), _windows(width, size[1])
    if mode == "max":
        return torch.stack([torch.stack([tensor[..., r0:r1, c0:c1].amax(dim=(-2, -1)) for c0, c1 in columns], -1)
                            for r0, r1 in rows], -2)
    return _averaging(rows, height, tensor) @ tensor @ _averaging(columns, width, tensor).T


def _windows(length: int, out: int) -> list[tuple[int, int]]:
    """Adaptive pooling's windows: [floor(i·L/out), ceil((i+1)·L/out))."""
    return [(i * length // out, -(-(i + 1) * length // out)) for i in range(out)]


def _averaging(windows: list[tuple[int, int]], length: int, like: torch.Tensor) -> torch.Tensor:
    """[out, length]: row i averages window i."""
    matrix = torch.zeros(len(windows), length, dtype=like.dtype, device=like.device)
    for i, (start, stop) in enumerate(windows):
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def gram_matrix(f_in: torch.Tensor, f_out: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """FSP matrix (Yim et al. 2017): G = F_in · F_outᵀ / (H·W), shape [N, C_in, C_out].

    When the two maps differ in spatial size, the larger is pooled to the smaller's."""
    h = min(f_in.shape[-2], f_out.shape[-2])
    w = min(f_in.shape[-1], f_out.shape[-1])
    a = _pool_to(f_in.float(), (h, w), pool).flatten(2)
    b = _pool_to(f_out.float(), (h, w), pool).flatten(2)
    return torch.bmm(a, b.transpose(1, 2)) / (h * w)


class FeatureLoss(Loss):
    needs_teacher = True

    def setup(self, student, teachers):
        # Check the shapes once, before training, for an early clear error.
        self.forward(student, teachers, None)


class FeatureMSELoss(FeatureLoss):
    """Mean squared error between the student's and the teacher's tapped features."""

    name = "mse"

    def forward(self, student, teachers, targets):
        teacher = _teacher(teachers, self.name)
        suffixes = _pairs(student.features, "out")
        if not suffixes:
            _tap(student, "out", self.name, "student")
        losses = []
        for suffix in suffixes:
            s = student.features["out" + suffix]
            t = _tap(teacher, "out" + suffix, self.name, "teacher")
            _same_shape(s, t, self.name, "out" + suffix)
            losses.append(F.mse_loss(s.float(), t.float()))
        return torch.stack(losses).mean()


@attrs.define
class GramParams:
    pool: Literal["avg", "max"] = attrs.field(default="avg", metadata={"help": "how the larger of a block's input and output maps is pooled to the smaller"})


class GramLoss(FeatureLoss):
    """FSP/Gram matching (Yim et al. 2017): MSE between G = F_inᵀF_out/(H·W) of student and teacher."""

    name = "gram"
    Params = GramParams

    def forward(self, student, teachers, targets):
        teacher = _teacher(teachers, self.name)
        suffixes = _pairs(student.features, "out")
        if not suffixes:
            _tap(student, "out", self.name, "student")
        losses = []
        for suffix in suffixes:
            pair = {}
            for role, output in (("student", student), ("teacher", teacher)):
                f_in = _tap(output, "in" + suffix, self.name, role)
                f_out = _tap(output, "out" + suffix, self.name, role)
                pair[role] = gram_matrix(f_in, f_out, self.params.pool)
            _same_shape(pair["student"], pair["teacher"], self.name, "in/out" + suffix, "Gram matrices (channels in × out)")
            losses.append(F.mse_loss(pair["student"], pair["teacher"]))
        return torch.stack(losses).mean()


@attrs.define
class HintParams:
    regressor: Literal["auto", "always", "never"] = attrs.field(
        default="auto", metadata={"help": "1×1-conv regressor on the student's guided layer: auto = only where channels differ"}
    )


class HintLoss(FeatureLoss):
    """FitNet hint (Romero et al. 2015): MSE between a regressed student layer and the teacher's hint layer."""

    name = "hint"
    Params = HintParams

    def __init__(self, params=None):
        super().__init__(params)
        self.regressor: nn.Module | None = None

    def setup(self, student, teachers):
        s = _tap(student, "hint", self.name, "student")
        t = _tap(_teacher(teachers, self.name), "hint", self.name, "teacher")
        mode = self.params.regressor
        if mode == "always" or (mode == "auto" and s.shape[1] != t.shape[1]):
            self.regressor = nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1)
        elif s.shape[1] != t.shape[1]:
            raise UserError(
                f"loss 'hint': the student's guided layer has {s.shape[1]} channels, the teacher's hint {t.shape[1]}, and regressor = \"never\"",
                fix='set regressor = "auto" (a 1×1 conv maps the channels)',
            )

    def forward(self, student, teachers, targets):
        s = _tap(student, "hint", self.name, "student").float()
        t = _tap(_teacher(teachers, self.name), "hint", self.name, "teacher").float()
        if self.regressor is not None:
            s = self.regressor(s)
        if s.shape[-2:] != t.shape[-2:]:  # pool the larger map to the smaller
            size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
            s, t = _pool_to(s, size, "avg"), _pool_to(t, size, "avg")
        _same_shape(s, t, self.name, "hint")
        return F.mse_loss(s, t)


@attrs.define
class KDEnsembleParams(KDParams):
    aggregate: Literal["mean-logits", "sum-kl"] = attrs.field(
        default="mean-logits", metadata={"help": "mean-logits: KD to the teachers' mean logits; sum-kl: the sum of one KD term per teacher"}
    )


class KDEnsembleLoss(KDLoss):
    """KD from several teachers: α·(KD to their mean logits, or Σ per-teacher KD) + (1−α)·CE."""

    name = "kd-ensemble"
    Params = KDEnsembleParams
    needs_teacher = True

    def forward(self, student, teachers, targets):
        if self.params.aggregate == "mean-logits" or len(teachers) == 1:
            return super().forward(student, teachers, targets)
        implementation = ops.kd_loss if self.use_fused else ops.kd_loss_eager
        T, alpha = self.params.temperature, self.params.alpha
        kd = sum(implementation(student.logits, t.logits.to(student.logits.dtype), temperature=T) for t in teachers)
        if alpha >= 1.0:
            return kd
        return alpha * kd + (1.0 - alpha) * F.cross_entropy(student.logits.float(), targets)


@hookimpl
def pyramidkd_register_losses():
    return [FeatureMSELoss, GramLoss, HintLoss, KDEnsembleLoss]
