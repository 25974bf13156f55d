"""The ``dkd`` loss: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

With student logits z^S, teacher logits z^T, label t and temperature T, let
p = softmax(z / T). DKD splits Hinton's KL(p^T ‖ p^S) into

* **TCKD** (target-class KD): KL between the binary distributions
  b = [p_t, 1 − p_t] of teacher and student;
* **NCKD** (non-target-class KD): KL between the distributions over the
  *non-target* classes, renormalised: p̂_j = p_j / (1 − p_t) for j ≠ t,

so that KD = TCKD + (1 − p^T_t)·NCKD (the paper's Eq. 7), and weighs the two
parts independently (Eq. 8). As in the official implementation (mdistiller,
``DKD.forward_train``) the total loss is

    loss = ce_weight · CE(z^S, t) + w · T² · (α · TCKD + β · NCKD)

with batch means, and w a linear warm-up of the DKD term. mdistiller ramps it per
*epoch*, w = min(epoch / 20, 1) on CIFAR-100 (1 epoch on ImageNet). A pyramidkd
loss sees batches, not epochs, so here the ramp is per optimisation step:
w = min(step / warmup_steps, 1), the step counted from 1 within the stage (set
``warmup_steps = 20 × steps per epoch`` for the paper's schedule; 0, the
default, switches it off). The step count is a buffer of the loss module, so it
is saved in ``last.pt`` and a resumed stage continues the ramp exactly.

Defaults are mdistiller's CIFAR-100 ones: α = 1, β = 8, T = 4, ce_weight = 1
(its configs lower β for some teacher/student pairs, e.g. 2 for ResNet56 →
ResNet20; ImageNet: β = 0.5, T = 1).

Everything is computed in log space (log-sum-exp over the non-target logits), so
a confident student (p_t → 1) gives no log(0).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from pyramidkd.engine import Loss, UserError, non_negative, positive


def _teacher_logits(teachers) -> torch.Tensor:
    if len(teachers) == 1:
        return teachers[0].logits.float()
    return torch.stack([t.logits.float() for t in teachers]).mean(0)  # an ensemble: averaged logits


def _binary_and_non_target(logits: torch.Tensor, target_mask: torch.Tensor):
    """log b = [log p_t, log(1 − p_t)] and log p̂ over the non-target classes
    (0 at the target position, which callers mask out)."""
    all_lse = torch.logsumexp(logits, dim=1)
    non_target = logits.masked_fill(target_mask, float("-inf"))
    non_target_lse = torch.logsumexp(non_target, dim=1)
    target_logit = logits.masked_fill(~target_mask, 0.0).sum(1)
    log_binary = torch.stack([target_logit - all_lse, non_target_lse - all_lse], dim=1)
    log_hat = (logits - non_target_lse.unsqueeze(1)).masked_fill(target_mask, 0.0)
    return log_binary, log_hat


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(TCKD, NCKD)`` at temperature ``temperature`` (without the T² factor)."""
    if student_logits.dim() != 2 or student_logits.shape[1] < 2:
        raise UserError(
            f"loss dkd needs logits of shape [batch, classes] with at least 2 classes, got {tuple(student_logits.shape)}",
            fix="use dkd with a classification model of 2 or more classes",
        )
    target_mask = F.one_hot(targets, student_logits.shape[1]).bool()
    log_bs, log_hat_s = _binary_and_non_target(student_logits.float() / temperature, target_mask)
    log_bt, log_hat_t = _binary_and_non_target(teacher_logits.float() / temperature, target_mask)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(1)
    hat_t = log_hat_t.exp().masked_fill(target_mask, 0.0)
    nckd = (hat_t * (log_hat_t - log_hat_s)).sum(1)
    return tckd, nckd


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """T² · (α · TCKD + β · NCKD), batch mean (no CE, no warm-up)."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, targets, temperature)
    return temperature**2 * (alpha * tckd.mean() + beta * nckd.mean())


@attrs.define
class DKDParams:
    alpha: float = attrs.field(default=1.0, validator=non_negative, metadata={"help": "weight of TCKD (target class), paper: 1.0"})
    beta: float = attrs.field(default=8.0, validator=non_negative,
                              metadata={"help": "weight of NCKD (non-target classes), paper: 8.0 on CIFAR-100, 0.5 on ImageNet"})
    temperature: float = attrs.field(default=4.0, validator=positive, metadata={"help": "softmax temperature T, e.g. 4.0"})
    ce_weight: float = attrs.field(default=1.0, validator=non_negative, metadata={"help": "weight of the cross-entropy term"})
    warmup_steps: int = attrs.field(default=0, validator=non_negative,
                                    metadata={"help": "ramp the DKD term up linearly over this many steps; 0 = off"})


class DKDLoss(Loss):
    """Decoupled KD (Zhao et al. 2022): CE + T²·(α·TCKD + β·NCKD), optional warm-up."""

    name = "dkd"
    Params = DKDParams
    needs_teacher = True

    def __init__(self, params=None):
        super().__init__(params)
        # Training steps seen in this stage (a buffer: saved with the loss state).
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def warmup_factor(self) -> torch.Tensor:
        if self.params.warmup_steps <= 0:
            return torch.ones((), device=self.steps.device)
        return (self.steps.float() / self.params.warmup_steps).clamp(max=1.0)

    def forward(self, student, teachers, targets):
        p = self.params
        if self.training and torch.is_grad_enabled():
            self.steps += 1
        logits = student.logits
        distill = dkd_loss(logits, _teacher_logits(teachers), targets, alpha=p.alpha, beta=p.beta, temperature=p.temperature)
        loss = self.warmup_factor() * distill
        if p.ce_weight > 0:
            loss = loss + p.ce_weight * F.cross_entropy(logits.float(), targets)
        return loss
