"""Logit distillation losses: ``kd`` (Hinton et al. 2015) and ``mse-logits``.

``kd`` = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y), batch-mean. It
runs on the fused C++/CUDA op when that is built (``backend = "auto"``), else on
the eager PyTorch reference; with several teachers their logits are averaged.
"""

from __future__ import annotations

import logging
from typing import Literal

import attrs
import torch
import torch.nn.functional as F

from pyramidkd.engine import Loss, UserError, between, hookimpl, ops, positive

log = logging.getLogger("pyramidkd")
_fallback_reported = False


def teacher_logits(teachers) -> torch.Tensor:
    """The teacher's logits, or several teachers' mean (taken in float32, returned
    in their own dtype: under bf16/fp16 autocast the student's is the same)."""
    if len(teachers) == 1:
        return teachers[0].logits
    return torch.stack([t.logits.float() for t in teachers]).mean(0).to(teachers[0].logits.dtype)


@attrs.define
class KDParams:
    temperature: float = attrs.field(default=4.0, validator=positive, metadata={"help": "softmax temperature T, e.g. 4.0"})
    alpha: float = attrs.field(default=0.9, validator=between(0.0, 1.0), metadata={"help": "weight of the KD term; 1-alpha weighs CE"})
    backend: Literal["auto", "fused", "eager"] = "auto"


class KDLoss(Loss):
    """Hinton knowledge distillation: temperature-softened KL to the teacher plus CE."""

    name = "kd"
    Params = KDParams
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
        return implementation(
            student.logits,
            teacher_logits(teachers).to(student.logits.dtype),
            temperature=self.params.temperature,
            labels=targets if self.params.alpha < 1.0 else None,
            alpha=self.params.alpha,
        )


class MSELogitsLoss(Loss):
    """Mean squared error between student and teacher logits."""

    name = "mse-logits"
    needs_teacher = True

    def forward(self, student, teachers, targets):
        return F.mse_loss(student.logits.float(), teacher_logits(teachers).float())


@hookimpl
def pyramidkd_register_losses():
    return [KDLoss, MSELogitsLoss]
