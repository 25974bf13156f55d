"""``ce``: cross-entropy on the student's logits (training from scratch)."""

from __future__ import annotations

import attrs
import torch.nn.functional as F

from pyramidkd.engine import Loss, between, hookimpl


@attrs.define
class CEParams:
    label_smoothing: float = attrs.field(default=0.0, validator=between(0.0, 1.0))


class CrossEntropyLoss(Loss):
    """Cross-entropy with the true labels."""

    name = "ce"
    Params = CEParams

    def forward(self, student, teachers, targets):
        return F.cross_entropy(student.logits.float(), targets, label_smoothing=self.params.label_smoothing)


@hookimpl
def pyramidkd_register_losses():
    return [CrossEntropyLoss]
