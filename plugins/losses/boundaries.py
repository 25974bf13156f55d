"""``ab`` — Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
Neurons (Heo, Lee, Yun & Choi, AAAI 2019): the initialisation loss.

References: the authors' ``cifar10_AB_distillation.py`` (bhheo/AB_distillation:
``criterion_alternative_L2``, the connectors of ``models/distillation_module.py``, the
``Distillation`` epoch's ``loss_alter / 1000 * 3``) and the CRD code base, RepDistiller
``distiller_zoo/AB.py`` (``ABLoss``: ``self.w = [2**(i-feat_num+1) for i in range(feat_num)]``,
each term ``/ bsz`` then ``/ 1000 * 3``) with ``helper/pretrain.py`` (``init``).

On the pre-activations ``preact.1`` … ``preact.K`` (the last min(K_s, K_t) stages of each,
as ``ofd`` pairs them), per stage a connector conv1×1(C_s→C_t, no bias) + BN (the
authors' ``build_feature_connector``: conv weights N(0, √(2 / C_t)), BN weight 1, bias 0)
maps the student's map s; with the teacher's map t and the margin m,

    AB(s, t) = Σ (s + m)² · 1[s > −m and t ≤ 0] + (s − m)² · 1[s ≤ m and t > 0]

and the term is Σ_i 2^(i−n) · AB_i / N over the n paired stages (the last weighs 1, the one
before ½, …). ``feat_weight`` (default 3/1000, the references' ``/ 1000 * 3``) scales it.
The reference trains this term alone (no cross-entropy) for 30 epochs, then the student
by CE (RepDistiller) or KD at T = 3 (the authors) with no feature term: the ``ab`` scheme
plans both stages (plugins/schemes/multistage.py) and builds this loss with
``ce_weight = 0``; the loss's own default, 1, is the zoo's convention for feature losses.

RepDistiller's ``Connector`` differs in one point: where the shapes match it uses no
connector, and otherwise a ``ConvReg``; this follows the authors (always conv1×1 + BN).
Stages are compared at the same spatial size (the references' pairs have it); other
sizes are refused before training.
"""

from __future__ import annotations

import attrs
import torch

from pyramidkd.engine import UserError, hookimpl, non_negative, positive
from pyramidkd.plugins.losses.learned import require_map, tapped
from pyramidkd.plugins.losses.ofd import PreactConnectorLoss, paired_names
from pyramidkd.plugins.losses.tapped import feat_weight_field

MAP_FIX = "ab reads the pre-activations preact.1 … preact.K: use models that declare them in tap_points() (the model zoo, vgg)"
SIZE_FIX = ("use a teacher and a student whose compared stages have the same spatial size (e.g. resnet56 → resnet20, "
            "wrn_40_2 → wrn_16_2, vgg13_bn → vgg8_bn at the same image size)")


@attrs.define
class ABParams:
    ce_weight: float = attrs.field(default=1.0, validator=non_negative, metadata={
        "help": "weight of the cross-entropy term (the ab scheme's initialisation stage sets 0, as the reference)"})
    feat_weight: float = feat_weight_field(3e-3)
    margin: float = attrs.field(default=1.0, validator=positive, metadata={"help": "the activation-boundary margin m"})


def alternative_l2(source: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Σ (s + m)²·[s > −m, t ≤ 0] + (s − m)²·[s ≤ m, t > 0] (the authors' ``criterion_alternative_L2``)."""
    off = ((source > -margin) & (target <= 0)).to(source.dtype)
    on = ((source <= margin) & (target > 0)).to(source.dtype)
    return ((source + margin) ** 2 * off + (source - margin) ** 2 * on).sum()


def _preact_names(shapes: dict) -> list[str]:
    stages = [name for name in shapes if name.startswith("preact.") and name[7:].isdigit() and int(name[7:]) >= 1]
    return sorted(stages, key=lambda name: int(name[7:]))


class ABLoss(PreactConnectorLoss):
    """Activation boundaries (Heo et al. 2019): ce_weight·CE + feat_weight · Σ_i 2^(i−n) · AB(connector(s_i), t_i) / N."""

    name = "ab"
    Params = ABParams

    def check_features(self, student, teacher):
        for ours, theirs in paired_names(_preact_names(student), _preact_names(teacher)):
            if tuple(student[ours])[1:] != tuple(teacher[theirs])[1:]:
                raise UserError(f"loss 'ab' compares the student's {ours} {tuple(student[ours])} with the teacher's {theirs} "
                                f"{tuple(teacher[theirs])} (per sample): their spatial sizes differ", fix=SIZE_FIX)

    def module_shapes(self, student, teacher):
        shapes = {}
        for ours, theirs in self.pairs(student, teacher):
            s = require_map(tapped(student, ours, self.name, "student"), self.name, "student", ours, MAP_FIX)
            t = require_map(tapped(teacher, theirs, self.name, "teacher"), self.name, "teacher", theirs, MAP_FIX)
            self.check_features({ours: tuple(s.shape[1:])}, {theirs: tuple(t.shape[1:])})
            shapes[f"student {ours}"], shapes[f"teacher {theirs}"] = (s.shape[1],), (t.shape[1],)
        return shapes

    def learned_term(self, student, teacher, dtype):
        total = 0.0
        for index, count, ours, theirs, source in self.connected(student, teacher, dtype):
            target = teacher.features[theirs].detach().to(dtype)
            self.check_features({ours: tuple(source.shape[1:])}, {theirs: tuple(target.shape[1:])})
            total = total + alternative_l2(source, target, self.params.margin) * 2.0 ** (index + 1 - count)
        return total / student.logits.shape[0]


@hookimpl
def pyramidkd_register_losses():
    return [ABLoss]
