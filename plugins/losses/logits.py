"""Logit losses of the method zoo: ``dkd`` (Decoupled KD) and ``dist`` (DIST).

``dkd`` — Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022; reference
mdistiller ``mdistiller/distillers/DKD.py`` (``dkd_loss``, ``DKD.forward_train``).
With p = softmax(z / T), the target class t and the binary b = [p_t, 1 − p_t]:

    TCKD = KL(b^T ‖ b^S),   NCKD = KL(p̂^T ‖ p̂^S) over the classes j ≠ t,
    loss = ce_weight · CE(z^S, y) + min(epoch / warmup, 1) · T² · (α · TCKD + β · NCKD)

batch means. As in the reference, NCKD's distributions are softmaxes of z / T with
1000 subtracted from the target logit; TCKD is computed in log space (the reference
takes log of the summed probabilities, which is −inf for a saturated student). The
epoch is 1-based (mdistiller passes ``epoch`` from 1), so epoch 1 of 20 gives 1/20.

``dist`` — Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS
2022; reference hunto/DIST_KD ``classification/lib/models/losses/dist_kd.py``. With
y = softmax(z / τ) and the Pearson correlation ρ:

    inter = 1 − mean_n ρ(y^S_n,:, y^T_n,:)      (each sample's class distribution)
    intra = 1 − mean_c ρ(y^S_:,c, y^T_:,c)      (each class across the batch)
    loss  = ce_weight · CE + τ² · (β · inter + γ · intra)

β = γ = 2 are the effective weights on CIFAR-100 (the authors' β = γ = 1 times their
loss weight 2); τ = 4 on CIFAR-100, 1 on ImageNet.

Both accept ``standardize`` (Sun et al. 2024's logit standardisation, applied to both
logits before the temperature; the CE term keeps the raw student logits). Several
teachers are averaged at the logit level, as ``kd`` does.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from pyramidkd.engine import Loss, UserError, hookimpl, non_negative, positive
from pyramidkd.plugins.losses.distillation import standardize, teacher_logits
from pyramidkd.plugins.losses.tapped import at_least_float32

TARGET_OFFSET = 1000.0  # mdistiller's mask: the target logit lowered by 1000 for NCKD
PEARSON_EPS = 1e-8  # DIST_KD's cosine_similarity eps


def _check_logits(logits: torch.Tensor, loss: str) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise UserError(
            f"loss {loss!r} needs logits of shape [batch, classes] with 2 or more classes, got {tuple(logits.shape)}",
            fix=f"use {loss!r} with a classifier of 2 or more classes",
        )


def dkd_terms(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD, NCKD) of float32 logits at ``temperature``, without the T² factor."""
    target_mask = F.one_hot(targets, student.shape[1]).bool()
    zs, zt = student / temperature, teacher / temperature
    log_bs, log_bt = _log_binary(zs, target_mask), _log_binary(zt, target_mask)
    tckd = F.kl_div(log_bs, log_bt, reduction="none", log_target=True).sum(1)
    offset = TARGET_OFFSET * target_mask.to(zs.dtype)
    log_hat_s = F.log_softmax(zs - offset, dim=1)
    hat_t = F.softmax(zt - offset, dim=1)
    nckd = F.kl_div(log_hat_s, hat_t, reduction="none").sum(1)
    return tckd, nckd


def _log_binary(logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """[log p_target, log (1 − p_target)] per row, by log-sum-exp."""
    total = torch.logsumexp(logits, dim=1)
    target = logits.masked_fill(~target_mask, float("-inf")).logsumexp(1)
    others = logits.masked_fill(target_mask, float("-inf")).logsumexp(1)
    return torch.stack([target - total, others - total], dim=1)


def _pair(student, teachers, use_standardize: bool, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and (mean) teacher logits in float32, standardised when asked."""
    logits_s, logits_t = at_least_float32(student.logits), at_least_float32(teacher_logits(teachers))
    _check_logits(logits_s, loss)
    if use_standardize:
        return standardize(logits_s), standardize(logits_t)
    return logits_s, logits_t


@attrs.define
class DKDParams:
    ce_weight: float = attrs.field(default=1.0, validator=non_negative, metadata={"help": "weight of the cross-entropy term"})
    alpha: float = attrs.field(default=1.0, validator=non_negative, metadata={"help": "weight of TCKD (target class)"})
    beta: float = attrs.field(default=8.0, validator=non_negative,
                              metadata={"help": "weight of NCKD (non-target classes): 8 on CIFAR-100, 2-8 per pair in the published configs"})
    temperature: float = attrs.field(default=4.0, validator=positive, metadata={"help": "softmax temperature T (ImageNet: 1)"})
    warmup: int = attrs.field(default=20, validator=non_negative,
                              metadata={"help": "epochs over which the DKD term ramps up linearly, min(epoch / warmup, 1); 0 = off"})
    standardize: bool = attrs.field(default=False, metadata={"help": "z-score both logits over the classes first (Sun et al. 2024)"})


class DKDLoss(Loss):
    """Decoupled KD (Zhao et al. 2022): CE + warm-up · T² · (α·TCKD + β·NCKD)."""

    name = "dkd"
    Params = DKDParams
    needs_teacher = True

    def warmup_factor(self) -> float:
        if self.params.warmup <= 0:
            return 1.0
        return min(self.epoch / self.params.warmup, 1.0)  # self.epoch: set by the loop (Loss.start_epoch)

    def forward(self, student, teachers, targets):
        p = self.params
        logits_s, logits_t = _pair(student, teachers, p.standardize, self.name)
        tckd, nckd = dkd_terms(logits_s, logits_t, targets, p.temperature)
        distill = p.temperature**2 * (p.alpha * tckd.mean() + p.beta * nckd.mean())
        loss = self.warmup_factor() * distill
        if p.ce_weight > 0:
            loss = loss + p.ce_weight * F.cross_entropy(at_least_float32(student.logits), targets)
        return loss


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + PEARSON_EPS)


@attrs.define
class DISTParams:
    ce_weight: float = attrs.field(default=1.0, validator=non_negative, metadata={"help": "weight of the cross-entropy term"})
    beta: float = attrs.field(default=2.0, validator=non_negative,
                              metadata={"help": "weight of the inter-class relation (the authors' 1 × loss weight 2)"})
    gamma: float = attrs.field(default=2.0, validator=non_negative,
                               metadata={"help": "weight of the intra-class relation (the authors' 1 × loss weight 2)"})
    temperature: float = attrs.field(default=4.0, validator=positive, metadata={"help": "softmax temperature τ (CIFAR-100: 4, ImageNet: 1)"})
    standardize: bool = attrs.field(default=False, metadata={"help": "z-score both logits over the classes first (Sun et al. 2024)"})


class DISTLoss(Loss):
    """DIST (Huang et al. 2022): CE + τ²·(β·inter-class + γ·intra-class Pearson relation loss)."""

    name = "dist"
    Params = DISTParams
    needs_teacher = True

    def forward(self, student, teachers, targets):
        p = self.params
        logits_s, logits_t = _pair(student, teachers, p.standardize, self.name)
        y_s = F.softmax(logits_s / p.temperature, dim=1)
        y_t = F.softmax(logits_t / p.temperature, dim=1)
        inter = 1.0 - pearson_rows(y_s, y_t).mean()
        intra = 1.0 - pearson_rows(y_s.T, y_t.T).mean()
        loss = p.temperature**2 * (p.beta * inter + p.gamma * intra)
        if p.ce_weight > 0:
            loss = loss + p.ce_weight * F.cross_entropy(at_least_float32(student.logits), targets)
        return loss


@hookimpl
def pyramidkd_register_losses():
    return [DKDLoss, DISTLoss]
