"""``reviewkd`` — Knowledge Review (Chen, Liu, Zhao & Jia, "Distilling Knowledge via
Knowledge Review", CVPR 2021).

Reference: mdistiller ``mdistiller/distillers/ReviewKD.py`` (``ReviewKD``, ``ABF``,
``hcl_loss``; CIFAR-100 ``configs/cifar100/reviewkd.yaml``: weight 5.0, and
``mdistiller/engine/cfg.py``: CE 1, 20 warm-up epochs, ``STU_PREACT = False``,
mid channels min(512, C_pooled)), the authors' ``CIFAR-100/model/reviewkd.py``.

Levels. The student's stage outputs ``feat.1`` … ``feat.K`` and ``pooled`` (as a 1×1
map) against the teacher's pre-activations ``preact.1`` … ``preact.K`` and ``pooled``
(the last min(K_s, K_t) stages of each, then pooled). From the deepest level back, an
attention-based fusion module (ABF) turns each student level into the teacher's
channels and size: conv1×1 + BN to the mid width; below the deepest level, the fused
map from the level below is nearest-upsampled to this level's size, and a conv1×1 on
both (2 channels, sigmoid) weighs the two; the result (nearest-resized to the teacher's
size when it differs) passes to the next level and, through conv3×3 + BN, becomes this
level's output. Convs as there: ``kaiming_uniform_(a=1)`` for the two convs, PyTorch's
default for the attention conv, BN weight 1, bias 0.

Hierarchical context loss, per level: the MSE of the full maps, plus the MSE of both
maps adaptively average-pooled to 4×4, 2×2 and 1×1 (each only when smaller than the
level's height) weighted 1/2, 1/4, 1/8 in that order, divided by the sum of the weights
used; summed over levels. The loss is ``ce_weight·CE + reviewkd_weight · min(epoch /
warmup, 1) · HCL`` with the 1-based epoch (``Loss.start_epoch``), as the reference.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from pyramidkd.engine import hookimpl, non_negative
from pyramidkd.plugins.losses.features import _pool_to
from pyramidkd.plugins.losses.learned import LearnedTermLoss, conv1x1, require_map, stage_taps, tapped
from pyramidkd.plugins.losses.tapped import at_least_float32, ce_weight_field, one_teacher

MAX_MID_CHANNELS = 512
CONTEXT_SIZES = (4, 2, 1)
STUDENT_FIX = "reviewkd reads the student's feat.1 … feat.K and pooled: use a model that declares them in tap_points() (the model zoo, vgg)"
TEACHER_FIX = "reviewkd reads the teacher's preact.1 … preact.K and pooled: use a model that declares them in tap_points() (the model zoo)"


@attrs.define
class ReviewKDParams:
    ce_weight: float = ce_weight_field()
    reviewkd_weight: float = attrs.field(default=5.0, validator=non_negative, metadata={
        "help": "weight of the hierarchical context loss (mdistiller CIFAR-100: 5.0; the authors' scripts 0.6–8 by pair)"})
    warmup: int = attrs.field(default=20, validator=non_negative, metadata={
        "help": "epochs over which the weight rises linearly: × min(epoch / warmup, 1); 0: none"})


class ABF(nn.Module):
    """Attention-based fusion of one level (the reference's ``ABF``)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(conv1x1(in_channels, mid_channels), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channels * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, below: torch.Tensor | None, out_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(this level's output, the fused map passed to the next level up)."""
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            below = F.interpolate(below, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, below], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + below * z[:, 1].view(n, 1, h, w)
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def hcl_loss(student_levels: list[torch.Tensor], teacher_levels: list[torch.Tensor]) -> torch.Tensor:
    """The reference's ``hcl_loss``."""
    total = 0.0
    for fs, ft in zip(student_levels, teacher_levels):
        height = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        weight, weights = 1.0, 1.0
        for size in CONTEXT_SIZES:
            if size >= height:
                continue
            weight /= 2.0
            loss = loss + F.mse_loss(_pool_to(fs, (size, size), "avg"), _pool_to(ft, (size, size), "avg")) * weight
            weights += weight
        total = total + loss / weights
    return total


class ReviewKDLoss(LearnedTermLoss):
    """Knowledge review (Chen et al. 2021): CE + reviewkd_weight · warm-up · HCL(ABF-fused student levels, teacher levels)."""

    name = "reviewkd"
    Params = ReviewKDParams

    def __init__(self, params=None):
        super().__init__(params)
        self.abfs = nn.ModuleList()

    def student_taps(self):
        return ("feat.*", "pooled")

    def teacher_taps(self):
        return ("preact.*", "pooled")

    def levels(self, student, teacher) -> tuple[list[str], list[str]]:
        """Tap names of the compared levels, shallow to deep, ``pooled`` last."""
        ours, theirs = stage_taps(student, "feat", self.name, "student"), stage_taps(teacher, "preact", self.name, "teacher")
        count = min(len(ours), len(theirs))
        return ours[-count:] + ["pooled"], theirs[-count:] + ["pooled"]

    def level_maps(self, output, names: list[str], role: str, fix: str) -> list[torch.Tensor]:
        maps = [require_map(tapped(output, name, self.name, role), self.name, role, name, fix) for name in names[:-1]]
        pooled = tapped(output, "pooled", self.name, role)
        return maps + [pooled.reshape(pooled.shape[0], -1, 1, 1)]

    def module_shapes(self, student, teacher):
        ours, theirs = self.levels(student, teacher)
        shapes = {f"student {name}": (m.shape[1],) for name, m in zip(ours, self.level_maps(student, ours, "student", STUDENT_FIX))}
        shapes.update({f"teacher {name}": (m.shape[1],) for name, m in zip(theirs, self.level_maps(teacher, theirs, "teacher", TEACHER_FIX))})
        return shapes

    def build(self, shapes):
        in_channels = [shape[0] for key, shape in shapes.items() if key.startswith("student ")]
        out_channels = [shape[0] for key, shape in shapes.items() if key.startswith("teacher ")]
        mid = min(MAX_MID_CHANNELS, in_channels[-1])
        abfs = [ABF(c_in, mid, c_out, index < len(in_channels) - 1) for index, (c_in, c_out) in enumerate(zip(in_channels, out_channels))]
        self.abfs.extend(reversed(abfs))  # deepest first, as the reference's abfs[::-1]

    def learned_term(self, student, teacher, dtype):
        ours, theirs = self.levels(student, teacher)
        x = [m.to(dtype) for m in self.level_maps(student, ours, "student", STUDENT_FIX)][::-1]
        targets = [m.detach().to(dtype) for m in self.level_maps(teacher, theirs, "teacher", TEACHER_FIX)]
        sizes = [tuple(t.shape[-2:]) for t in targets][::-1]
        out, fused = self.abfs[0](x[0], None, sizes[0])
        results = [out]
        for features, abf, size in zip(x[1:], self.abfs[1:], sizes[1:]):
            out, fused = abf(features, fused, size)
            results.insert(0, out)
        return hcl_loss(results, targets)

    def warmup_factor(self) -> float:
        warmup = self.params.warmup
        return 1.0 if warmup == 0 else min(getattr(self, "epoch", 1) / warmup, 1.0)

    def forward(self, student, teachers, targets):
        term = self.feature_term(student, one_teacher(teachers, self.name))
        loss = self.params.reviewkd_weight * self.warmup_factor() * term
        if self.params.ce_weight > 0:
            loss = loss + self.params.ce_weight * F.cross_entropy(at_least_float32(student.logits), targets)
        return loss


@hookimpl
def pyramidkd_register_losses():
    return [ReviewKDLoss]
