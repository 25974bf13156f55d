"""``cc`` — Correlation Congruence (Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang,
"Correlation Congruence for Knowledge Distillation", ICCV 2019), in the CRD code
base's version.

Reference: RepDistiller ``distiller_zoo/CC.py`` (``Correlation``, "code emailed to me by
the original author") as ``train_student.py`` uses it for ``--distill correlation``:
``embed_s = LinearEmbed(feat_s[-1].shape[1], feat_dim)``, ``embed_t = LinearEmbed(...)``
(``models/util.py``: a plain ``nn.Linear``, no normalisation), both trained, on the
pooled features ``feat[-1]``; ``scripts/run_cifar_distill.sh``: ``-a 0 -b 0.02``, CE 1.

On ``pooled``: e_s = W_s·f_s + b_s, e_t = W_t·f_t + b_t (both [N, feat_dim], the
teacher's embedding trained too, on detached teacher features), Δ = |e_s − e_t|, and the
term is the mean over consecutive sample pairs of the batch of Σ_d Δ_i,d · Δ_i+1,d:
(1 / (N − 1)) Σ_{i=1}^{N−1} ⟨Δ_i, Δ_{i+1}⟩ — the batch-order approximation of the
paper's correlation-congruence term that the reference computes (0 for a batch of one,
where the reference's mean over no pair is nan). The loss is
``ce_weight·CE + feat_weight·term``. The embeddings take PyTorch's default ``Linear``
initialisation, as there.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from pyramidkd.engine import hookimpl, positive
from pyramidkd.plugins.losses.learned import LearnedTermLoss, tapped
from pyramidkd.plugins.losses.tapped import ce_weight_field, feat_weight_field


@attrs.define
class CCParams:
    ce_weight: float = ce_weight_field()
    feat_weight: float = feat_weight_field(0.02)
    feat_dim: int = attrs.field(default=128, validator=positive, metadata={"help": "width of the student's and the teacher's linear embeddings"})


class LinearEmbed(nn.Module):
    """RepDistiller's ``LinearEmbed``: flatten, then one linear layer."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(x.shape[0], -1))


class CCLoss(LearnedTermLoss):
    """Correlation congruence (Peng et al. 2019, CRD code base): CE + feat_weight · mean_i ⟨|Δ_i|, |Δ_i+1|⟩ of the embedded pooled features."""

    name = "cc"
    Params = CCParams
    taps = ("pooled",)

    def __init__(self, params=None):
        super().__init__(params)
        self.embed_s: LinearEmbed | None = None
        self.embed_t: LinearEmbed | None = None

    def module_shapes(self, student, teacher):
        shapes = {}
        for role, output in (("student", student), ("teacher", teacher)):
            pooled = tapped(output, "pooled", self.name, role)
            shapes[f"{role} pooled"] = (pooled[0].numel(),)
        return shapes

    def build(self, shapes):
        self.embed_s = LinearEmbed(shapes["student pooled"][0], self.params.feat_dim)
        self.embed_t = LinearEmbed(shapes["teacher pooled"][0], self.params.feat_dim)

    def learned_term(self, student, teacher, dtype):
        e_s = self.embed_s(student.features["pooled"].to(dtype))
        e_t = self.embed_t(teacher.features["pooled"].to(dtype))
        delta = torch.abs(e_s - e_t)
        if delta.shape[0] < 2:  # no consecutive pair (the reference's mean of nothing is nan): no term
            return delta.sum() * 0.0
        return (delta[:-1] * delta[1:]).sum(1).mean()


@hookimpl
def pyramidkd_register_losses():
    return [CCLoss]
