"""``ofd`` — A Comprehensive Overhaul of Feature Distillation (Heo, Kim, Yun, Park,
Kwak & Choi, ICCV 2019).

Reference: mdistiller ``mdistiller/distillers/OFD.py`` (``feat_loss``, ``ConnectorConvBN``,
``init_ofd_modules``, ``ofd_loss``; CIFAR-100 defaults in ``mdistiller/engine/cfg.py``:
CE 1, feature weight 1e-3, 1×1 connectors), the same as the authors' CIFAR
``distiller.py`` (``distillation_loss``: sum / batch / 1000).

On the pre-activations ``preact.1`` … ``preact.K`` (the last min(K_s, K_t) stages of each,
as the reference's ``_align_list``): per stage a connector conv1×1(C_s→C_t, no bias) + BN
maps the student's map s; the teacher's map t is average-pooled to the student's size;
with the stage's per-channel margin m the partial L2 distance is

    Σ (s − max(t, m))² · [s > max(t, m) or max(t, m) > 0]  /  N

(no loss where the teacher is below zero and the student below it too), weighted
1 / 2^(n − i) for the i-th of n stages, and the loss is ``ce_weight·CE +
feat_weight·Σ_stages``. Connectors are initialised as there: conv weights
N(0, √(2 / C_t)), BN weight 1, bias 0.

Margins. The reference takes each channel's margin from the teacher's BN before the
ReLU, reading it as a Gaussian N(β, γ²): m = E[x | x < 0] = β − |γ|·φ(β/|γ|) / Φ(−β/|γ|)
(−3|γ| where Φ(−β/|γ|) ≤ 0.001). A loss here sees the teacher's tapped tensors, not its
modules, so ``ofd`` applies that formula to the per-channel mean and (biased) standard
deviation of the teacher's pre-activation over the batch (N, H, W), recomputed every
call: the Gaussian the BN parameters stand for, measured. (With the teacher's BN in
train mode and a pre-activation that is the BN's output, these are β and |γ| up to BN's
ε; in a ResNet the pre-activation also holds the shortcut, which the reference's bn2
parameters leave out.)

Teacher mode. The reference trains with the teacher in train mode (its ``train()``
override), so the teacher's BN layers normalise with batch statistics. ``ofd`` asks for
that through ``teacher_batch_statistics = True``, and the training loop honours it: while
training, the teachers' BatchNorm layers use batch statistics and leave their running
statistics untouched; validation and test run them in eval mode.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch
from torch import nn

from pyramidkd.engine import hookimpl
from pyramidkd.plugins.losses.features import _pool_to
from pyramidkd.plugins.losses.learned import LearnedTermLoss, conv1x1, require_map, stage_taps, tapped
from pyramidkd.plugins.losses.tapped import ce_weight_field, feat_weight_field

MAP_FIX = "ofd reads the pre-activations preact.1 … preact.K: use models that declare them in tap_points() (the model zoo)"
TAIL_PROBABILITY = 0.001  # below it the reference takes −3σ as the margin


@attrs.define
class OFDParams:
    ce_weight: float = ce_weight_field()
    feat_weight: float = feat_weight_field(1e-3)


def gaussian_margin(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per channel E[x | x < 0] of N(mean, std²), or −3·std where P(x < 0) ≤ 0.001
    (the reference's ``init_ofd_modules``, vectorised)."""
    std = std.abs().clamp_min(torch.finfo(std.dtype).tiny)
    z = mean / std
    below = 0.5 * torch.erfc(z / math.sqrt(2.0))  # Φ(−z)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    conditional = mean - std * density / below.clamp_min(torch.finfo(std.dtype).tiny)
    return torch.where(below > TAIL_PROBABILITY, conditional, -3.0 * std)


def batch_margin(teacher_map: torch.Tensor) -> torch.Tensor:
    """[1, C, 1, 1] margins from the per-channel batch statistics of a teacher's pre-activation."""
    mean = teacher_map.mean(dim=(0, 2, 3))
    std = teacher_map.std(dim=(0, 2, 3), unbiased=False)
    return gaussian_margin(mean, std).view(1, -1, 1, 1)


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Σ (s − max(t, m))² where s > max(t, m) or max(t, m) > 0, over the batch size."""
    target = torch.max(target, margin)
    mask = ((source > target) | (target > 0)).to(source.dtype)
    return ((source - target) ** 2 * mask).sum() / source.shape[0]


def connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    conv = conv1x1(student_channels, teacher_channels)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(teacher_channels))


def paired_names(student: list[str], teacher: list[str]) -> list[tuple[str, str]]:
    """(student tap, teacher tap) of the last min(K_s, K_t) stages of each."""
    count = min(len(student), len(teacher))
    return list(zip(student[len(student) - count:], teacher[len(teacher) - count:]))


class PreactConnectorLoss(LearnedTermLoss):
    """A term on the pre-activations of the last min(K_s, K_t) stages of each model, the
    student's map passed through a :func:`connector` per stage (``ofd``, ``ab``)."""

    taps = ("preact.*",)

    def __init__(self, params=None):
        super().__init__(params)
        self.connectors = nn.ModuleList()

    def pairs(self, student, teacher) -> list[tuple[str, str]]:
        return paired_names(stage_taps(student, "preact", self.name, "student"), stage_taps(teacher, "preact", self.name, "teacher"))

    def build(self, shapes):
        student = [shape[0] for key, shape in shapes.items() if key.startswith("student ")]
        teacher = [shape[0] for key, shape in shapes.items() if key.startswith("teacher ")]
        for s, t in zip(student, teacher):
            self.connectors.append(connector(s, t))

    def connected(self, student, teacher, dtype):
        """For each of the n paired stages: (index, n, student tap, teacher tap, the
        student's map through its connector, in ``dtype``)."""
        pairs = self.pairs(student, teacher)
        for index, (ours, theirs) in enumerate(pairs):
            yield index, len(pairs), ours, theirs, self.connectors[index](student.features[ours].to(dtype))


class OFDLoss(PreactConnectorLoss):
    """Overhaul of feature distillation (Heo et al. 2019): CE + feat_weight · Σ_i partial L2(connector(s_i), t_i; margin_i) / 2^(n−i)."""

    name = "ofd"
    Params = OFDParams
    #: The reference runs the teacher's BN on batch statistics while training (see the module docstring).
    teacher_batch_statistics: ClassVar[bool] = True

    def module_shapes(self, student, teacher):
        shapes = {}
        for ours, theirs in self.pairs(student, teacher):
            for role, output, name in (("student", student, ours), ("teacher", teacher, theirs)):
                shapes[f"{role} {name}"] = (require_map(tapped(output, name, self.name, role), self.name, role, name, MAP_FIX).shape[1],)
        return shapes

    def learned_term(self, student, teacher, dtype):
        total = 0.0
        for index, count, _, theirs, source in self.connected(student, teacher, dtype):
            with torch.no_grad():
                t = teacher.features[theirs].detach().to(dtype)
                margin = batch_margin(t)
                target = _pool_to(t, tuple(source.shape[-2:]), "avg")
            total = total + partial_l2(source, target, margin) / 2 ** (count - index - 1)
        return total


@hookimpl
def pyramidkd_register_losses():
    return [OFDLoss]
