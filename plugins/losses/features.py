"""Feature-matching losses for hint stages, and the ensemble KD loss.

They read tapped tensors (``ModelOutput.features``: tap name -> tensor) and compare
the student with the first teacher. Each declares the taps it reads (``Loss.taps``
through ``student_taps()`` / ``teacher_taps()``): either points of the tap contract
(``feat.k``, ``preact.k``, ``feat.*``; the ``kd`` and ``fitnet`` schemes tap them on
any model that declares ``tap_points()``), or, left at their defaults, the names the
Pyramid schemes tap by module path:

* ``mse``  — ``layers`` (e.g. ``["feat.3"]``, ``["feat.*"]``), default ``out`` (or
  several: ``out.<k>``): the maps to match, of equal shapes;
* ``gram`` — ``layers`` in order, the flow (FSP/Gram matrix) between each consecutive
  pair matched (e.g. ``["feat.0", "feat.*"]``: stem → stage 1 → … → stage K), default
  the pairs ``in`` / ``out`` (or ``in.<k>`` / ``out.<k>``); channel counts must match;
* ``hint`` — the student's ``guided_layer`` (default: the same name) against the
  teacher's ``hint_layer`` (default ``feat.2``); a 1×1-conv regressor maps the
  channels and the larger map is pooled to the smaller, so any pair of models works
  (``fitnet`` sets ``hint_layer = "hint"``, the layer it taps itself), or, with
  ``regressor = "convreg"``, the CRD code base's regressor (see :class:`HintLoss`);
  ``ce_weight`` / ``feat_weight`` make it FitNet in one stage of the kd scheme.

All are mean-reduced, so their scale does not depend on the batch or feature size.
``kd-ensemble`` uses logits only.
"""

from __future__ import annotations

from typing import Literal, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from pyramidkd.engine import FieldValueError, Loss, ModelOutput, UserError, hookimpl, non_negative, ops
from pyramidkd.plugins.losses.distillation import KDLoss, KDParams


def _pairs(features: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """Suffixes of the taps named ``prefix`` or ``prefix.<k>`` ("" for the plain one)."""
    return [name[len(prefix):] for name in features if name == prefix or name.startswith(prefix + ".")]


def _tap(output: ModelOutput, name: str, loss: str, role: str) -> torch.Tensor:
    try:
        return output.features[name]
    except KeyError:
        have = ", ".join(sorted(output.features)) or "none"
        raise UserError(
            f"loss {loss!r} needs the {role}'s tap {name!r}, but the stage taps {have}",
            fix=f"use loss {loss!r} with the kd scheme (it taps what the loss reads) or a scheme that taps {name!r} "
            "(pyramid-forward, pyramid-backward, gram-direct, fitnet)",
        ) from None


def _expand(layers: Sequence[str], available) -> list[str]:
    """``layers`` with ``feat.*`` / ``preact.*`` replaced by every such tap in ``available`` (stage order)."""
    names: list[str] = []
    for layer in layers:
        if layer.endswith(".*"):
            stages = [n for n in available if n.startswith(layer[:-1]) and n[len(layer) - 1:].isdigit()]
            names += sorted((n for n in stages if int(n[len(layer) - 1:]) >= 1), key=lambda n: int(n[len(layer) - 1:]))
        else:
            names.append(layer)
    return names


def _check_layers(instance, attribute, value):
    for layer in value:
        if not isinstance(layer, str) or not layer:
            raise FieldValueError(f"entries must be tap names, got {layer!r}", 'e.g. layers = ["feat.3"] or ["feat.*"]')


def _teacher(teachers: Sequence[ModelOutput], loss: str) -> ModelOutput:
    if not teachers:
        raise UserError(f"loss {loss!r} needs a teacher", fix="use it in a scheme that gives the stage a teacher")
    return teachers[0]


def _same_shape(student: torch.Tensor, teacher: torch.Tensor, loss: str, tap: str, what: str = "feature maps") -> None:
    if student.shape != teacher.shape:
        raise UserError(
            f"loss {loss!r}: the student's and the teacher's {what} at tap {tap!r} differ in shape: "
            f"student {tuple(student.shape[1:])} vs teacher {tuple(teacher.shape[1:])} (per sample)",
            fix="give the student the teacher's width and input size (mse and gram compare equal shapes), "
            'or use loss "hint", whose 1×1 regressor maps the student\'s channels to the teacher\'s',
        )


def _pool_to(tensor: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Adaptive pooling to ``size``, by ops whose backward is deterministic on CUDA
    (``adaptive_{avg,max}_pool2d``'s is not, so ``deterministic = true`` refuses it).

    When the sizes divide (every built-in scheme) it is plain pooling with the exact
    kernel, the same windows and values; otherwise the same windows as adaptive
    pooling, averaged by two matrix products or maxed window by window."""
    height, width = tensor.shape[-2:]
    if (height, width) == tuple(size):
        return tensor
    if height % size[0] == 0 and width % size[1] == 0:
        kernel = (height // size[0], width // size[1])
        return F.max_pool2d(tensor, kernel) if mode == "max" else F.avg_pool2d(tensor, kernel)
    rows, columns = _windows(height, size[0]), _windows(width, size[1])
    if mode == "max":
        return torch.stack([torch.stack([tensor[..., r0:r1, c0:c1].amax(dim=(-2, -1)) for c0, c1 in columns], -1)
                            for r0, r1 in rows], -2)
    return _averaging(rows, height, tensor) @ tensor @ _averaging(columns, width, tensor).T


def _windows(length: int, out: int) -> list[tuple[int, int]]:
    """Adaptive pooling's windows: [floor(i·L/out), ceil((i+1)·L/out))."""
    return [(i * length // out, -(-(i + 1) * length // out)) for i in range(out)]


def _averaging(windows: list[tuple[int, int]], length: int, like: torch.Tensor) -> torch.Tensor:
    """[out, length]: row i averages window i."""
    matrix = torch.zeros(len(windows), length, dtype=like.dtype, device=like.device)
    for i, (start, stop) in enumerate(windows):
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def gram_matrix(f_in: torch.Tensor, f_out: torch.Tensor, pool: str = "avg") -> torch.Tensor:
    """FSP matrix (Yim et al. 2017): G = F_in · F_outᵀ / (H·W), shape [N, C_in, C_out].

    When the two maps differ in spatial size, the larger is pooled to the smaller's."""
    h = min(f_in.shape[-2], f_out.shape[-2])
    w = min(f_in.shape[-1], f_out.shape[-1])
    a = _pool_to(f_in.float(), (h, w), pool).flatten(2)
    b = _pool_to(f_out.float(), (h, w), pool).flatten(2)
    return torch.bmm(a, b.transpose(1, 2)) / (h * w)


class FeatureLoss(Loss):
    needs_teacher = True

    def setup(self, student, teachers):
        # Check the shapes once, before training, for an early clear error.
        self.forward(student, teachers, None)


LAYERS_HELP = 'tap points to match, e.g. ["feat.3"] or ["feat.*"] (any scheme that taps them: kd); empty: the "out" taps of the Pyramid schemes'


@attrs.define
class MSEParams:
    layers: list[str] = attrs.field(factory=list, validator=_check_layers, metadata={"since": "0.3.0", "help": LAYERS_HELP})


class FeatureMSELoss(FeatureLoss):
    """Mean squared error between the student's and the teacher's tapped features."""

    name = "mse"
    Params = MSEParams
    matches = "same_shape"

    def student_taps(self):
        return tuple(self.params.layers) or ("out",)

    teacher_taps = student_taps

    def matched(self, features) -> list[str]:
        """The tap names compared: ``layers`` expanded, or ``out`` / ``out.<k>``."""
        if self.params.layers:
            return _expand(self.params.layers, features)
        return ["out" + suffix for suffix in _pairs(features, "out")]

    def check_features(self, student, teacher):
        names = [n for n in self.matched(student) if n in teacher]
        super().check_features({n: student[n] for n in names}, {n: teacher[n] for n in names})

    def forward(self, student, teachers, targets):
        teacher = _teacher(teachers, self.name)
        names = self.matched(student.features)
        if not names:
            _tap(student, self.student_taps()[0], self.name, "student")
        losses = []
        for name in names:
            s = _tap(student, name, self.name, "student")
            t = _tap(teacher, name, self.name, "teacher")
            _same_shape(s, t, self.name, name)
            losses.append(F.mse_loss(s.float(), t.float()))
        return torch.stack(losses).mean()


@attrs.define
class GramParams:
    pool: Literal["avg", "max"] = attrs.field(default="avg", metadata={"help": "how the larger of a block's input and output maps is pooled to the smaller"})
    layers: list[str] = attrs.field(factory=list, validator=_check_layers, metadata={"since": "0.3.0",
        "help": 'tap points in order, the flow between each consecutive pair matched, e.g. ["feat.0", "feat.*"]; empty: the "in" / "out" taps of the Pyramid schemes'})


class GramLoss(FeatureLoss):
    """FSP/Gram matching (Yim et al. 2017): MSE between G = F_inᵀF_out/(H·W) of student and teacher."""

    name = "gram"
    Params = GramParams

    def student_taps(self):
        return tuple(self.params.layers) or ("in", "out")

    teacher_taps = student_taps

    def flows(self, features, teacher_features=None) -> list[tuple[str, str]]:
        """(input tap, output tap) of each matched flow."""
        if not self.params.layers:
            return [("in" + suffix, "out" + suffix) for suffix in _pairs(features, "out")]
        names = _expand(self.params.layers, features)
        if teacher_features is not None:
            names = [n for n in names if n in teacher_features]
        return list(zip(names, names[1:]))

    def check_features(self, student, teacher):
        for f_in, f_out in self.flows(student, teacher):
            if f_in in teacher and f_out in teacher:
                ours, theirs = (student[f_in][0], student[f_out][0]), (teacher[f_in][0], teacher[f_out][0])
                if ours != theirs:
                    raise UserError(
                        f"loss 'gram': the Gram matrix of {f_in} → {f_out} is {ours[0]}×{ours[1]} in the student "
                        f"but {theirs[0]}×{theirs[1]} in the teacher (channels in × out must match)",
                        fix='use loss "hint" (its 1×1-conv regressor maps the student\'s channels to the teacher\'s), '
                        "or points where both models have the same channel counts",
                    )

    def forward(self, student, teachers, targets):
        teacher = _teacher(teachers, self.name)
        flows = self.flows(student.features, teacher.features)
        if not flows:
            _tap(student, self.student_taps()[-1], self.name, "student")
        losses = []
        for f_in, f_out in flows:
            pair = {}
            for role, output in (("student", student), ("teacher", teacher)):
                pair[role] = gram_matrix(_tap(output, f_in, self.name, role), _tap(output, f_out, self.name, role), self.params.pool)
            _same_shape(pair["student"], pair["teacher"], self.name, f"{f_in}/{f_out}", "Gram matrices (channels in × out)")
            losses.append(F.mse_loss(pair["student"], pair["teacher"]))
        return torch.stack(losses).mean()


@attrs.define
class HintParams:
    regressor: Literal["auto", "always", "never", "convreg"] = attrs.field(
        default="auto", metadata={"help": "1×1-conv regressor on the student's guided layer: auto = only where channels differ "
                                          "(the larger map then pooled to the smaller), always, never; convreg = the CRD code "
                                          "base's ConvReg instead (conv + BN + ReLU, sized to the teacher's map)"}
    )
    # "was": 0.2.0's hint loss read the tap named "hint"; such stages keep their fingerprint.
    hint_layer: str = attrs.field(default="feat.2", metadata={"since": "0.3.0", "was": "hint",
        "help": 'the teacher\'s hint layer, a tap point such as "feat.2" or "preact.3" (FitNet: a middle stage)'})
    guided_layer: str = attrs.field(default="", metadata={"since": "0.3.0", "help": "the student's guided layer (default: hint_layer)"})
    ce_weight: float = attrs.field(default=0.0, validator=non_negative, metadata={"since": "0.4.0",
        "help": "weight of the cross-entropy term (0: the pure hint term, as a hint stage; FitNet in one stage: 1)"})
    feat_weight: float = attrs.field(default=1.0, validator=non_negative, metadata={"since": "0.4.0",
        "help": "weight of the hint MSE (FitNet in one stage, the CRD code base: 100)"})


def convreg_conv(student: Sequence[int], teacher: Sequence[int]) -> nn.Module | None:
    """The convolution of the CRD code base's ``ConvReg`` that maps a student map
    [C, H, W] onto the teacher's, or ``None`` where its rules have none: a 3×3
    stride-2 conv when the student's map is twice the teacher's, a 4×4 stride-2
    transposed conv when it is half, a valid conv of kernel 1 + H_s − H_t (1×1 at
    equal sizes) when it is larger."""
    (c_s, *size_s), (c_t, *size_t) = student, teacher
    if all(s == 2 * t for s, t in zip(size_s, size_t)):
        return nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    if all(2 * s == t for s, t in zip(size_s, size_t)):
        return nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    if all(s >= t for s, t in zip(size_s, size_t)):
        return nn.Conv2d(c_s, c_t, kernel_size=tuple(1 + s - t for s, t in zip(size_s, size_t)))
    return None


class HintLoss(FeatureLoss):
    """FitNet hint (Romero et al. 2015): ce_weight · CE + feat_weight · MSE(regressor(guided layer), hint layer).

    The defaults (CE 0, weight 1) are the pure hint term of a hint stage (the fitnet
    scheme's). FitNet as the CRD code base trains it (RepDistiller ``train_student.py``,
    ``--distill hint -r 1 -a 0 -b 100``: one stage, ``hint_layer = 2``) is
    ``{ name = "hint", ce_weight = 1.0, feat_weight = 100.0, regressor = "convreg" }``
    in a kd-scheme stage: feat.2 is the same point (the second stage's output).

    The regressor. RepDistiller ``models/util.py`` ``ConvReg`` is always present and
    is conv → BatchNorm → ReLU, its conv chosen by the spatial sizes: a 3×3 stride-2
    conv when the student's map is twice the teacher's, a 4×4 stride-2 transposed conv
    when it is half, else a valid conv of kernel 1 + H_s − H_t (so a 1×1 conv at equal
    sizes, not a 3×3); smaller by another factor it has none. ``regressor = "convreg"``
    builds exactly that (and refuses the last case before training). ``auto`` (the
    default, older stages' behaviour) instead adds a bare 1×1 conv only where the
    channels differ and average-pools the larger map to the smaller, so any pair of
    maps works; on maps of equal sizes the two differ only by convreg's BN + ReLU.
    """

    name = "hint"
    Params = HintParams

    def __init__(self, params=None):
        super().__init__(params)
        self.regressor: nn.Module | None = None

    def student_taps(self):
        return (self.params.guided_layer or self.params.hint_layer,)

    def teacher_taps(self):
        return (self.params.hint_layer,)

    def maps(self, student, teachers) -> tuple[torch.Tensor, torch.Tensor]:
        s = _tap(student, self.student_taps()[0], self.name, "student")
        t = _tap(_teacher(teachers, self.name), self.params.hint_layer, self.name, "teacher")
        return s, t

    def check_features(self, student, teacher):
        s, t = student.get(self.student_taps()[0]), teacher.get(self.params.hint_layer)
        if s is None or t is None:
            return  # a missing tap is refused by name before this
        if len(s) != 3 or len(t) != 3:
            raise UserError(
                f"loss 'hint' matches feature maps [C, H, W], but the guided layer is {tuple(s)} and the hint layer {tuple(t)}",
                fix='set hint_layer (and guided_layer) to a stage output, e.g. "feat.2", not "pooled"',
            )
        if self.params.regressor == "never" and s[0] != t[0]:
            raise self.channel_error(s[0], t[0])
        if self.params.regressor == "convreg" and convreg_conv(s, t) is None:
            raise UserError(
                f"loss 'hint': regressor = \"convreg\" cannot map the student's guided layer {tuple(s)} onto the teacher's "
                f"hint layer {tuple(t)}: the CRD code base's ConvReg needs a student map larger, equal, twice or half the teacher's",
                fix='set regressor = "auto" (a 1×1 conv and pooling fit any sizes) or a hint_layer / guided_layer of matching sizes',
            )

    def channel_error(self, ours: int, theirs: int) -> UserError:
        return UserError(
            f"loss 'hint': the student's guided layer has {ours} channels, the teacher's hint {theirs}, and regressor = \"never\"",
            fix='set regressor = "auto" (a 1×1 conv maps the channels)',
        )

    def setup(self, student, teachers):
        s, t = self.maps(student, teachers)
        mode = self.params.regressor
        if self.params.ce_weight > 0 and student.logits.dim() != 2:
            raise UserError(
                f"loss 'hint': ce_weight = {self.params.ce_weight:g} needs the student's class logits [N, classes], "
                f"but this stage's model ends in a {tuple(student.logits.shape[1:])} map (a hint stage's partial model)",
                fix="set ce_weight = 0 in a hint stage (the fitnet scheme's stage1_loss), or use the loss in a kd-scheme stage",
            )
        if mode == "convreg":
            # check_features refuses the sizes ConvReg has no conv for, naming the fix.
            self.check_features({self.student_taps()[0]: tuple(s.shape[1:])}, {self.params.hint_layer: tuple(t.shape[1:])})
            conv = convreg_conv(tuple(s.shape[1:]), tuple(t.shape[1:]))
            self.regressor = nn.Sequential(conv, nn.BatchNorm2d(t.shape[1]), nn.ReLU())
        elif mode == "always" or (mode == "auto" and s.shape[1] != t.shape[1]):
            self.regressor = nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1)
        elif s.shape[1] != t.shape[1]:
            raise self.channel_error(s.shape[1], t.shape[1])

    def forward(self, student, teachers, targets):
        s, t = (m.float() for m in self.maps(student, teachers))
        if self.regressor is not None:
            s = self.regressor(s)
        if s.shape[-2:] != t.shape[-2:]:  # pool the larger map to the smaller
            size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
            s, t = _pool_to(s, size, "avg"), _pool_to(t, size, "avg")
        _same_shape(s, t, self.name, self.params.hint_layer)
        loss = self.params.feat_weight * F.mse_loss(s, t)
        if self.params.ce_weight > 0:
            loss = loss + self.params.ce_weight * F.cross_entropy(student.logits.float(), targets)
        return loss


@attrs.define
class KDEnsembleParams(KDParams):
    aggregate: Literal["mean-logits", "sum-kl"] = attrs.field(
        default="mean-logits", metadata={"help": "mean-logits: KD to the teachers' mean logits; sum-kl: the sum of one KD term per teacher"}
    )


class KDEnsembleLoss(KDLoss):
    """KD from several teachers: α·(KD to their mean logits, or Σ per-teacher KD) + (1−α)·CE."""

    name = "kd-ensemble"
    Params = KDEnsembleParams
    needs_teacher = True

    def forward(self, student, teachers, targets):
        if self.params.aggregate == "mean-logits" or len(teachers) == 1:
            return super().forward(student, teachers, targets)
        implementation = ops.kd_loss if self.use_fused else ops.kd_loss_eager
        T, alpha = self.params.temperature, self.params.alpha
        kd = sum(implementation(student.logits, t.logits.to(student.logits.dtype), temperature=T) for t in teachers)
        if alpha >= 1.0:
            return kd
        return alpha * kd + (1.0 - alpha) * F.cross_entropy(student.logits.float(), targets)


@hookimpl
def pyramidkd_register_losses():
    return [FeatureMSELoss, GramLoss, HintLoss, KDEnsembleLoss]
