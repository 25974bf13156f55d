"""Spatial feature losses of the method zoo: ``at`` and ``nst`` (stages feat.1 … feat.K).

``at`` — Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017;
reference RepDistiller ``distiller_zoo/AT.py`` (class ``Attention``) and mdistiller
``mdistiller/distillers/AT.py`` (``single_stage_at_loss``). Per stage, the attention
map is Q = mean over channels of |f|^p, flattened and L2-normalised per sample; the
term is Σ_stages mean_(n, hw) (Q_s − Q_t)². The references write f.pow(p): the same
for the default p = 2 (and for the non-negative post-ReLU stage outputs).

``nst`` — Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", 2017; reference RepDistiller ``distiller_zoo/NST.py`` (``NSTLoss``). Per
stage, each channel's map is L2-normalised over the positions; the term is the squared
MMD with the polynomial kernel k(a, b) = (aᵀb)², Σ_stages [mean k(t, t) + mean k(s, s)
− 2 mean k(s, t)], the means over the batch and every channel pair.

Both pair stage k of the student with stage k of the teacher for k = 1 … min(K_s, K_t)
(the references' ``zip``). When a pair's spatial sizes differ, the larger map is
average-pooled to the smaller size, as both references do (``adaptive_avg_pool2d``;
here by the deterministic pooling of :mod:`pyramidkd.plugins.losses.features`, the
same windows and values). Channel counts may differ.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from pyramidkd.engine import hookimpl, positive
from pyramidkd.plugins.losses.features import _pool_to
from pyramidkd.plugins.losses.tapped import FeatureTermLoss, at_least_float32, ce_weight_field, feat_weight_field, paired_stages, smaller_size


def same_size(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps in float32 (float64 kept) at the smaller of their spatial sizes."""
    size = smaller_size(f_s, f_t)
    return _pool_to(at_least_float32(f_s), size, "avg"), _pool_to(at_least_float32(f_t), size, "avg")


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """[N, H·W]: mean over channels of |f|^p, L2-normalised per sample."""
    return F.normalize(feature.abs().pow(p).mean(1).reshape(feature.shape[0], -1), dim=1)


@attrs.define
class ATParams:
    ce_weight: float = ce_weight_field()
    feat_weight: float = feat_weight_field(1000.0)
    p: float = attrs.field(default=2.0, validator=positive, metadata={"help": "exponent of the attention map, mean_c |f|^p"})


class ATLoss(FeatureTermLoss):
    """Attention transfer (Zagoruyko & Komodakis 2017): CE + feat_weight · Σ_stages mean (Q_s − Q_t)²."""

    name = "at"
    Params = ATParams
    taps = ("feat.*",)

    def feature_term(self, student, teacher):
        terms = []
        for f_s, f_t in paired_stages(student, teacher, self.name):
            f_s, f_t = same_size(f_s, f_t)
            difference = attention_map(f_s, self.params.p) - attention_map(f_t, self.params.p)
            terms.append(difference.pow(2).mean())
        return torch.stack(terms).sum()


def polynomial_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean over n, i, j of (a_n,i · b_n,j)² for a [N, Ca, HW], b [N, Cb, HW]."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@attrs.define
class NSTParams:
    ce_weight: float = ce_weight_field()
    feat_weight: float = feat_weight_field(50.0)


class NSTLoss(FeatureTermLoss):
    """Neuron selectivity transfer (Huang & Wang 2017): CE + feat_weight · Σ_stages MMD² (polynomial kernel)."""

    name = "nst"
    Params = NSTParams
    taps = ("feat.*",)

    def feature_term(self, student, teacher):
        terms = []
        for f_s, f_t in paired_stages(student, teacher, self.name):
            f_s, f_t = same_size(f_s, f_t)
            s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
            t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
            terms.append(polynomial_kernel_mean(t, t).detach() + polynomial_kernel_mean(s, s)
                         - 2 * polynomial_kernel_mean(s, t))
        return torch.stack(terms).sum()


@hookimpl
def pyramidkd_register_losses():
    return [ATLoss, NSTLoss]
