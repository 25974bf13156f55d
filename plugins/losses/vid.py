"""``vid`` — Variational Information Distillation (Ahn, Hu, Damianou, Lawrence & Dai,
"Variational Information Distillation for Knowledge Transfer", CVPR 2019).

Reference: RepDistiller ``distiller_zoo/VID.py`` (``VIDLoss``, the authors' code) as
``train_student.py`` uses it (``VIDLoss(s, t, t)`` on ``feat_s[1:-1]``), and mdistiller
``mdistiller/distillers/VID.py`` (``vid_loss``; CIFAR-100 defaults in
``mdistiller/engine/cfg.py``: CE 1, feature weight 1, init variance 5.0, eps 1e-5).

On the stage outputs ``feat.1`` … ``feat.K`` (paired by index, as ``zip`` pairs them),
per stage a regressor μ = conv1×1(C_s→C_t) → ReLU → conv1×1(C_t→C_t) → ReLU →
conv1×1(C_t→C_t) (no biases) predicts the teacher's map from the student's, with a
learned per-channel variance σ² = softplus(α) + ε, α initialised to
log(exp(init_var − ε) − 1) so that σ² starts at ``init_var``. The stage term is the
mean over every element of the Gaussian negative log-likelihood without its constant,
0.5·((μ − t)² / σ² + log σ²); the loss is ``ce_weight·CE + feat_weight·Σ_stages``. When
the maps differ in size, the larger is average-pooled to the smaller (the reference
compares heights and pools to a square; the same for the square maps it handles).
Regressor weights take PyTorch's default ``Conv2d`` initialisation, as there.
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from pyramidkd.engine import hookimpl, positive
from pyramidkd.plugins.losses.features import _pool_to
from pyramidkd.plugins.losses.learned import LearnedTermLoss, conv1x1, require_map, stage_taps, tapped
from pyramidkd.plugins.losses.tapped import ce_weight_field, feat_weight_field

MAP_FIX = "vid reads the stage outputs feat.1 … feat.K: use models that declare them in tap_points() (the model zoo, vgg)"


@attrs.define
class VIDParams:
    ce_weight: float = ce_weight_field()
    feat_weight: float = feat_weight_field(1.0)
    init_var: float = attrs.field(default=5.0, validator=positive,
                                  metadata={"help": "initial variance σ² of every channel (the reference's init_pred_var)"})
    eps: float = attrs.field(default=1e-5, validator=positive, metadata={"help": "added to softplus(α) so σ² > 0"})


def initial_log_scale(init_var: float, eps: float) -> float:
    """α with softplus(α) + eps = init_var (the reference's np.log(np.exp(init_var - eps) - 1))."""
    return math.log(math.expm1(init_var - eps))


class VIDLoss(LearnedTermLoss):
    """VID (Ahn et al. 2019): CE + feat_weight · Σ_k mean NLL of the teacher's feat.k under N(μ(student), σ²)."""

    name = "vid"
    Params = VIDParams
    taps = ("feat.*",)

    def __init__(self, params=None):
        super().__init__(params)
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def pairs(self, student, teacher) -> list[str]:
        """The stage taps compared: feat.1 … feat.min(K_s, K_t)."""
        ours, theirs = stage_taps(student, "feat", self.name, "student"), stage_taps(teacher, "feat", self.name, "teacher")
        return [name for name in ours if name in theirs]

    def module_shapes(self, student, teacher):
        shapes = {}
        for name in self.pairs(student, teacher):
            for role, output in (("student", student), ("teacher", teacher)):
                shapes[f"{role} {name}"] = (require_map(tapped(output, name, self.name, role), self.name, role, name, MAP_FIX).shape[1],)
        return shapes

    def build(self, shapes):
        init = initial_log_scale(self.params.init_var, self.params.eps)
        names = [key.split()[1] for key in shapes if key.startswith("student ")]
        for name in names:
            s, t = shapes[f"student {name}"][0], shapes[f"teacher {name}"][0]
            self.regressors.append(nn.Sequential(conv1x1(s, t), nn.ReLU(), conv1x1(t, t), nn.ReLU(), conv1x1(t, t)))
            self.log_scales.append(nn.Parameter(torch.full((t,), init)))

    def learned_term(self, student, teacher, dtype):
        total = 0.0
        for index, name in enumerate(self.pairs(student, teacher)):
            f_s = student.features[name].to(dtype)
            f_t = teacher.features[name].to(dtype)
            size = (min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1]))
            f_s, f_t = _pool_to(f_s, size, "avg"), _pool_to(f_t, size, "avg")
            mean = self.regressors[index](f_s)
            variance = (nn.functional.softplus(self.log_scales[index]) + self.params.eps).view(1, -1, 1, 1)
            total = total + (0.5 * ((mean - f_t) ** 2 / variance + torch.log(variance))).mean()
        return total


@hookimpl
def pyramidkd_register_losses():
    return [VIDLoss]
