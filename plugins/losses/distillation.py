"""Logit distillation losses: ``kd`` (Hinton et al. 2015) and ``mse-logits``.

``kd`` = w_kd·T²·KL(softmax(t/T) ‖ softmax(s/T)) + w_ce·CE(s, y), batch-mean, with
w_kd = α and w_ce = 1 − α unless ``kd_weight`` / ``ce_weight`` are set. It runs on
the fused C++/CUDA op when that is built (``backend = "auto"``), else on the eager
PyTorch reference; with several teachers their logits are averaged.

``standardize = true`` is logit standardisation (Sun et al., "Logit Standardization
in Knowledge Distillation", CVPR 2024; their code, sunshangquan/logit-standardization-KD,
``mdistiller/distillers/KD.py`` ``normalize``): both logits are z-scored over the
classes, (z − mean) / (std + 1e-7) with the unbiased std, before the temperature;
the CE term keeps the raw student logits, as there. The published CIFAR-100 setting
is T 2, ``kd_weight`` 9, ``ce_weight`` 0.1.
"""

from __future__ import annotations

import logging
from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from pyramidkd.engine import FieldValueError, Loss, UserError, between, hookimpl, non_negative, ops, positive
from pyramidkd.plugins.losses.tapped import at_least_float32

log = logging.getLogger("pyramidkd")
_fallback_reported = False


def teacher_logits(teachers) -> torch.Tensor:
    """The teacher's logits, or several teachers' mean (taken in float32, returned
    in their own dtype: under bf16/fp16 autocast the student's is the same)."""
    if len(teachers) == 1:
        return teachers[0].logits
    return torch.stack([t.logits.float() for t in teachers]).mean(0).to(teachers[0].logits.dtype)


STANDARDIZE_EPS = 1e-7  # added to σ, as in the reference's normalize()


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardisation (Sun et al. 2024): z-score each row over the classes
    (unbiased std, ε = 1e-7 added to σ), in float32 (float64 kept)."""
    logits = at_least_float32(logits)
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + STANDARDIZE_EPS)


@attrs.define
class KDParams:
    temperature: float = attrs.field(default=4.0, validator=positive, metadata={"help": "softmax temperature T, e.g. 4.0"})
    alpha: float = attrs.field(default=0.9, validator=between(0.0, 1.0), metadata={"help": "weight of the KD term; 1-alpha weighs CE"})
    backend: Literal["auto", "fused", "eager"] = "auto"


DEFAULT_ALPHA = 0.9


@attrs.define
class HintonKDParams(KDParams):
    # "since": at their defaults these keys stay out of the stage fingerprint, so kd
    # stages trained by 0.2.0 are reused (they computed exactly the default).
    standardize: bool = attrs.field(default=False, metadata={"since": "0.3.0", "help": "z-score both logits over the classes before the temperature (Sun et al. 2024)"})
    kd_weight: float | None = attrs.field(default=None, validator=non_negative, metadata={"since": "0.3.0", "help": "weight of the KD term (default alpha); e.g. 9 with standardize"})
    ce_weight: float | None = attrs.field(default=None, validator=non_negative, metadata={"since": "0.3.0", "help": "weight of cross-entropy (default 1 - alpha)"})

    def __attrs_post_init__(self):
        weights_set = self.kd_weight is not None or self.ce_weight is not None
        if weights_set and self.alpha != DEFAULT_ALPHA:
            raise FieldValueError(
                f"alpha = {self.alpha} and kd_weight / ce_weight are both set; they say the same thing two ways",
                "set either alpha (kd_weight = alpha, ce_weight = 1 - alpha) or kd_weight and ce_weight, not both",
            )
        if weights_set and self.weights() == (0.0, 0.0):
            raise FieldValueError("kd_weight and ce_weight are both 0: the loss would be 0", "give one of them a positive weight")

    def weights(self) -> tuple[float, float]:
        """(KD weight, CE weight): kd_weight / ce_weight where set, else alpha / 1 − alpha."""
        kd = self.kd_weight if self.kd_weight is not None else self.alpha
        ce = self.ce_weight if self.ce_weight is not None else 1.0 - self.alpha
        return kd, ce


class KDLoss(Loss):
    """Hinton knowledge distillation: temperature-softened KL to the teacher plus CE."""

    name = "kd"
    Params = HintonKDParams
    needs_teacher = True

    def __init__(self, params=None):
        super().__init__(params)
        self.use_fused = self._choose_backend()

    def _choose_backend(self) -> bool:
        global _fallback_reported
        backend = self.params.backend
        if backend == "eager":
            return False
        if ops.fused_available():
            return True
        if backend == "fused":
            raise UserError(
                f"loss kd: backend = \"fused\" but the fused op is not built ({ops.fused_unavailable_reason()})",
                fix='rebuild the package with a C++ compiler (pip install --no-build-isolation .), or set backend = "auto"',
            )
        if not _fallback_reported:
            log.warning("kd loss: fused op unavailable (%s); using the eager PyTorch implementation", ops.fused_unavailable_reason())
            _fallback_reported = True
        return False

    def forward(self, student, teachers, targets):
        implementation = ops.kd_loss if self.use_fused else ops.kd_loss_eager
        params = self.params
        teacher = teacher_logits(teachers)
        if getattr(params, "standardize", False):
            kd_weight, ce_weight = params.weights()
            kd = implementation(standardize(student.logits), standardize(teacher), temperature=params.temperature)
            if ce_weight == 0:
                return kd_weight * kd
            return kd_weight * kd + ce_weight * F.cross_entropy(at_least_float32(student.logits), targets)
        if getattr(params, "kd_weight", None) is None and getattr(params, "ce_weight", None) is None:
            alpha, scale = params.alpha, 1.0  # the α form, one fused call as before
        else:
            kd_weight, ce_weight = params.weights()
            scale = kd_weight + ce_weight  # w_kd·KD + w_ce·CE = s·(a·KD + (1 − a)·CE), a = w_kd / s
            alpha = kd_weight / scale
        loss = implementation(
            student.logits,
            teacher.to(student.logits.dtype),
            temperature=params.temperature,
            labels=targets if alpha < 1.0 else None,
            alpha=alpha,
        )
        return loss if scale == 1.0 else scale * loss


class MSELogitsLoss(Loss):
    """Mean squared error between student and teacher logits."""

    name = "mse-logits"
    needs_teacher = True

    def forward(self, student, teachers, targets):
        return F.mse_loss(student.logits.float(), teacher_logits(teachers).float())


@hookimpl
def pyramidkd_register_losses():
    return [KDLoss, MSELogitsLoss]
