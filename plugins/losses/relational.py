"""Relational feature losses of the method zoo: ``sp``, ``pkt``, ``rkd`` and ``kdsvd``.

They compare relations (between the samples of a batch, or between stages), so the
student's and the teacher's widths may differ (``kdsvd``: per stage, not between).

``sp`` — Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019;
reference RepDistiller ``distiller_zoo/SP.py`` (``Similarity``), on ``feat.K``:
G = normalize_rows(F Fᵀ) with F = f as [N, C·H·W]; term ‖G_t − G_s‖²_F / N².

``pkt`` — Passalis & Tefas, "Learning Deep Representations with Probabilistic
Knowledge Transfer", ECCV 2018; reference RepDistiller ``distiller_zoo/PKT.py``, on
``pooled``: rows L2-normalised (eps 1e-7), cosine similarities mapped to [0, 1] and
normalised per row into conditional distributions P; term mean_(i, j) P_t (log (P_t + ε)
− log (P_s + ε)), ε = 1e-7.

``rkd`` — Park et al., "Relational Knowledge Distillation", CVPR 2019; reference
RepDistiller ``distiller_zoo/RKDLoss.py`` (same in mdistiller ``RKD.py``), on
``pooled``: distance_weight · smoothL1(d_s / mean d_s, d_t / mean d_t) over the pairwise
Euclidean distances (the means over the non-zero ones) + angle_weight · smoothL1 of the
cosines of the angles ∠(e_i − e_j, e_k − e_j) over every triple.

``kdsvd`` — Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular
Value Decomposition", ECCV 2018; reference RepDistiller ``distiller_zoo/KDSVD.py``
(``KDSVD``), on ``feat.1`` … ``feat.K``. Each stage map as X = [N, H·W, C] (the paper's
form; the reference's ``view(-1, C, H * H)`` equals it only for square maps) gives
its right singular vectors V (teacher: the first k, student: the first k + 3, each
normalised), the student's aligned in sign and order to the teacher's by the largest
|cosine|, both scaled by the teacher's normalised singular values; consecutive stages
are related by the RBF exp(−(v_i − v_j)² / 8) between every channel of stage l and of
stage l − 1, and the term is Σ_l ‖R_s − R_t‖² / N (non-finite entries dropped, as there).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from pyramidkd.engine import UserError, hookimpl, non_negative, positive
from pyramidkd.plugins.losses.tapped import FeatureTermLoss, at_least_float32, ce_weight_field, feat_weight_field, last_stage, paired_stages, pooled

PKT_EPS = 1e-7
RKD_PDIST_EPS = 1e-12
KDSVD_RBF_SCALE = 8.0


@attrs.define
class SPParams:
    ce_weight: float = ce_weight_field()
    feat_weight: float = feat_weight_field(3000.0)


class SPLoss(FeatureTermLoss):
    """Similarity-preserving KD (Tung & Mori 2019): CE + feat_weight · ‖G_t − G_s‖²_F / N² on feat.K."""

    name = "sp"
    Params = SPParams
    taps = ("feat.*",)

    def feature_term(self, student, teacher):
        f_s, f_t = last_stage(student, self.name, "student"), last_stage(teacher, self.name, "teacher")
        batch = f_s.shape[0]
        g_s = F.normalize(_batch_gram(f_s), dim=1)
        g_t = F.normalize(_batch_gram(f_t), dim=1)
        return (g_t - g_s).pow(2).sum() / (batch * batch)


def _batch_gram(feature: torch.Tensor) -> torch.Tensor:
    flat = at_least_float32(feature).reshape(feature.shape[0], -1)
    return flat @ flat.T


@attrs.define
class PKTParams:
    ce_weight: float = ce_weight_field()
    feat_weight: float = feat_weight_field(30000.0)


def _pkt_distribution(embedding: torch.Tensor) -> torch.Tensor:
    norm = embedding.pow(2).sum(1, keepdim=True).sqrt()
    unit = embedding / (norm + PKT_EPS)
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)  # as the reference's x[x != x] = 0
    similarity = (unit @ unit.T + 1.0) / 2.0
    return similarity / similarity.sum(1, keepdim=True)


class PKTLoss(FeatureTermLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): CE + feat_weight · KL of cosine-similarity distributions on pooled."""

    name = "pkt"
    Params = PKTParams
    taps = ("pooled",)

    def feature_term(self, student, teacher):
        p_s = _pkt_distribution(pooled(student, self.name, "student"))
        p_t = _pkt_distribution(pooled(teacher, self.name, "teacher"))
        return (p_t * torch.log((p_t + PKT_EPS) / (p_s + PKT_EPS))).mean()


@attrs.define
class RKDParams:
    ce_weight: float = ce_weight_field()
    feat_weight: float = feat_weight_field(1.0)
    distance_weight: float = attrs.field(default=25.0, validator=non_negative, metadata={"help": "weight of the distance term"})
    angle_weight: float = attrs.field(default=50.0, validator=non_negative, metadata={"help": "weight of the angle term"})


def pairwise_distances(embedding: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [N, N] with a zero diagonal (squared distances clamped at 1e-12)."""
    squared = embedding.pow(2).sum(1)
    distances = (squared[:, None] + squared[None, :] - 2 * embedding @ embedding.T).clamp(min=RKD_PDIST_EPS).sqrt()
    eye = torch.eye(len(embedding), dtype=torch.bool, device=embedding.device)
    return distances.masked_fill(eye, 0.0)


def normalised_distances(embedding: torch.Tensor) -> torch.Tensor:
    distances = pairwise_distances(embedding)
    return distances / distances[distances > 0].mean()


def angles(embedding: torch.Tensor) -> torch.Tensor:
    """cos ∠(e_i − e_j, e_k − e_j) for every (j, i, k), flattened."""
    differences = F.normalize(embedding[None, :, :] - embedding[:, None, :], p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).reshape(-1)


class RKDLoss(FeatureTermLoss):
    """Relational KD (Park et al. 2019): CE + feat_weight · (distance_weight · distance + angle_weight · angle) on pooled."""

    name = "rkd"
    Params = RKDParams
    taps = ("pooled",)

    def feature_term(self, student, teacher):
        e_s, e_t = pooled(student, self.name, "student"), pooled(teacher, self.name, "teacher")
        with torch.no_grad():
            d_t, a_t = normalised_distances(e_t), angles(e_t)
        distance = F.smooth_l1_loss(normalised_distances(e_s), d_t)
        angle = F.smooth_l1_loss(angles(e_s), a_t)
        return self.params.distance_weight * distance + self.params.angle_weight * angle


@attrs.define
class KDSVDParams:
    ce_weight: float = ce_weight_field()
    feat_weight: float = feat_weight_field(1.0)
    k: int = attrs.field(default=1, validator=positive, metadata={"help": "singular vectors kept from the teacher (the student keeps k + 3)"})


def _finite(tensor: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(tensor), tensor, torch.zeros_like(tensor))


def leading_singular(feature: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Of X = [N, H·W, C]: the first ``count`` right singular vectors [N, C, count]
    (each normalised over C) and singular values [N, count] (normalised)."""
    x = at_least_float32(feature).flatten(2).transpose(1, 2)
    _, values, vh = torch.linalg.svd(x, full_matrices=False)
    vectors = _finite(vh.transpose(1, 2))[:, :, :count]
    return F.normalize(vectors, dim=1), F.normalize(_finite(values)[:, :count], dim=1)


def align_to(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """For each teacher vector, the student vector of largest |cosine|, with its sign."""
    cosine = student.transpose(1, 2) @ teacher  # [N, k_s, k_t]
    best = cosine.abs().amax(1, keepdim=True)
    selection = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return student @ selection


def _rbf(vectors: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    return torch.exp(-(vectors[:, :, None] - previous[:, None, :]).pow(2) / KDSVD_RBF_SCALE)


class KDSVDLoss(FeatureTermLoss):
    """KD via SVD (Lee et al. 2018): CE + feat_weight · Σ RBF-relation differences of consecutive stages' singular vectors."""

    name = "kdsvd"
    Params = KDSVDParams
    taps = ("feat.*",)
    matches = "same_channels"  # checked before training by Loss.check_features

    def feature_term(self, student, teacher):
        k = self.params.k
        terms, previous = [], None
        for index, (f_s, f_t) in enumerate(paired_stages(student, teacher, self.name), start=1):
            if f_s.shape[1] != f_t.shape[1]:
                raise UserError(
                    f"loss 'kdsvd': stage feat.{index} has {f_s.shape[1]} channels in the student and {f_t.shape[1]} "
                    "in the teacher; KD-SVD compares channel-by-channel relations, so they must be equal",
                    fix="use kdsvd for a pair of equal stage widths (e.g. resnet110 -> resnet32), or another loss (at, sp, rkd)",
                )
            v_t, s_t = leading_singular(f_t, k)
            v_s, _ = leading_singular(f_s, k + 3)
            v_s = align_to(v_s, v_t)
            v_t, v_s = v_t * s_t[:, None, :], v_s * s_t[:, None, :]
            if previous is not None:
                difference = (_rbf(v_s, previous[0]) - _rbf(v_t, previous[1]).detach()).pow(2)
                terms.append(_finite(difference).sum() / f_s.shape[0])
            previous = (v_s, v_t)
        if not terms:
            raise UserError(
                "loss 'kdsvd' relates consecutive stages, but the models give one stage (feat.1) to pair",
                fix="use kdsvd with models of two or more stages (feat.1 … feat.K)",
            )
        return torch.stack(terms).sum()


@hookimpl
def pyramidkd_register_losses():
    return [SPLoss, PKTLoss, RKDLoss, KDSVDLoss]
