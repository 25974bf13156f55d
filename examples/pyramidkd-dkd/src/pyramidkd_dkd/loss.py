"""The ``nkd`` loss: Normalized KD (Yang et al., ICCV 2023).

Zhendong Yang, Ailing Zeng, Zhe Li, Tianke Zhang, Chun Yuan, Yu Li, "From Knowledge
Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss
and Customized Soft Labels", ICCV 2023, arXiv:2303.13005. The authors' code:
yzd-v/cls_KD, ``mmcls/models/losses/nkd.py`` (class ``NKDLoss``).

NKD splits Hinton's KD at the target class t, like DKD, but writes both parts in
cross-entropy form and normalises the non-target part. With S = log softmax(z^S) and
T = softmax(z^T) at temperature 1 for the target part, and Ŝ, T̂ the same over the
non-target classes only (the target column removed) at temperature λ:

    L_target = − mean_n T_t · S_t
    L_non    = − γ · λ² · mean_n Σ_(j ≠ t) T̂_j · Ŝ_j
    loss     = ce_weight · CE(z^S, y) + L_target + L_non

Defaults are the authors': λ (``temperature``) 1, γ 1.5, and a CE weight of 1.
Several teachers are averaged at the logit level, as the built-in ``kd`` does.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from pyramidkd.engine import Loss, UserError, non_negative, positive


def _teacher_logits(teachers) -> torch.Tensor:
    if not teachers:
        raise UserError("loss 'nkd' needs a teacher", fix="use it with a scheme that gives the stage a teacher (nkd, kd)")
    return torch.stack([t.logits.float() for t in teachers]).mean(0)  # several teachers: averaged logits


def _without_target(logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """[N, C − 1]: each row without its target column."""
    return logits[~target_mask].reshape(logits.shape[0], logits.shape[1] - 1)


def nkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
             temperature: float = 1.0, gamma: float = 1.5) -> torch.Tensor:
    """L_target + L_non (no CE), batch means."""
    if student_logits.dim() != 2 or student_logits.shape[1] < 2:
        raise UserError(
            f"loss nkd needs logits of shape [batch, classes] with at least 2 classes, got {tuple(student_logits.shape)}",
            fix="use nkd with a classification model of 2 or more classes",
        )
    student, teacher = student_logits.float(), teacher_logits.float()
    target_mask = F.one_hot(targets, student.shape[1]).bool()
    log_s = F.log_softmax(student, dim=1).gather(1, targets[:, None])
    t_target = F.softmax(teacher, dim=1).gather(1, targets[:, None]).detach()
    target_part = -(t_target * log_s).mean()
    log_s_hat = F.log_softmax(_without_target(student, target_mask) / temperature, dim=1)
    t_hat = F.softmax(_without_target(teacher, target_mask) / temperature, dim=1)
    non_target_part = -gamma * temperature**2 * (t_hat * log_s_hat).sum(1).mean()
    return target_part + non_target_part


@attrs.define
class NKDParams:
    temperature: float = attrs.field(default=1.0, validator=positive, metadata={"help": "temperature λ of the non-target part (the authors: 1.0)"})
    gamma: float = attrs.field(default=1.5, validator=non_negative, metadata={"help": "weight γ of the non-target part (the authors: 1.5)"})
    ce_weight: float = attrs.field(default=1.0, validator=non_negative, metadata={"help": "weight of the cross-entropy term"})


class NKDLoss(Loss):
    """Normalized KD (Yang et al. 2023): CE + target part + γ·λ²·normalised non-target part."""

    name = "nkd"
    Params = NKDParams
    needs_teacher = True

    def forward(self, student, teachers, targets):
        p = self.params
        loss = nkd_loss(student.logits, _teacher_logits(teachers), targets, temperature=p.temperature, gamma=p.gamma)
        if p.ce_weight > 0:
            loss = loss + p.ce_weight * F.cross_entropy(student.logits.float(), targets)
        return loss
