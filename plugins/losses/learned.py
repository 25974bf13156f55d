"""Shared pieces of the method-zoo losses that train modules of their own (``cc``'s
embeddings, ``vid``'s regressors, ``ofd``'s connectors, ``reviewkd``'s fusion modules).

:class:`LearnedTermLoss` builds those modules from the shapes of the first features it
sees: in :meth:`~pyramidkd.engine.Loss.setup` during a run (so they join the
optimiser, the checkpoint and DDP's gradient sync), or on the first call when a loss is
called directly without ``setup``. Construction follows the reference code bases,
initialisation included, drawing from torch's global generator at build time (a
run seeds it, so a run is reproducible; the value of a call does not depend on the
seed once the weights are given). The modules depend on channel counts only; features
whose channels differ from those they were built for are refused by name.

The term is computed in the modules' dtype (float32 unless the loss was converted,
e.g. ``loss.double()``), outside autocast, whatever the features' dtype (bf16 included)
and memory format (``channels_last`` included), as the references compute it in float32.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from pyramidkd.engine import ModelOutput, UserError
from pyramidkd.plugins.losses.tapped import FeatureTermLoss, one_teacher, tap_error

_STAGE = re.compile(r"(feat|preact)\.(\d+)")


class LearnedTermLoss(FeatureTermLoss):
    """A :class:`FeatureTermLoss` whose term has trainable modules.

    Subclasses implement :meth:`module_shapes` (what the modules depend on, by tap),
    :meth:`build` (create them from those shapes) and :meth:`learned_term`."""

    #: Says what a user changes when the shapes cannot be bridged (added to errors).
    shape_fix = "train the stage from the start (the loss's modules are built for the models it first sees)"

    def __init__(self, params=None):
        super().__init__(params)
        self.built_shapes: dict[str, tuple[int, ...]] | None = None

    def module_shapes(self, student: ModelOutput, teacher: ModelOutput) -> dict[str, tuple[int, ...]]:
        """``"student feat.1" -> (channels,)`` …: what the modules are built for;
        refuses (``UserError``) missing taps and maps of the wrong rank."""
        raise NotImplementedError

    def build(self, shapes: dict[str, tuple[int, ...]]) -> None:
        raise NotImplementedError

    def learned_term(self, student: ModelOutput, teacher: ModelOutput, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def setup(self, student, teachers):
        self.ensure_built(student, one_teacher(teachers, self.name))

    def ensure_built(self, student: ModelOutput, teacher: ModelOutput) -> None:
        shapes = self.module_shapes(student, teacher)
        if self.built_shapes is None:
            self.build(shapes)
            self.built_shapes = shapes
            self.to(student.logits.device)
            return
        for key, shape in shapes.items():
            built = self.built_shapes.get(key)
            if built != shape:
                raise UserError(
                    f"loss {self.name!r}: its modules were built for {key} of shape {built}, "
                    f"but tap {key.split()[-1]!r} of the {key.split()[0]} now has shape {shape}",
                    fix=self.shape_fix,
                )

    def compute_dtype(self) -> torch.dtype:
        parameter = next(self.parameters(), None)
        return parameter.dtype if parameter is not None else torch.float32

    def feature_term(self, student, teacher):
        self.ensure_built(student, teacher)
        with torch.autocast(student.logits.device.type, enabled=False):
            return self.learned_term(student, teacher, self.compute_dtype())


def require_map(tensor: torch.Tensor, loss: str, role: str, tap: str, fix: str) -> torch.Tensor:
    """``tensor`` if it is a feature map [N, C, H, W]; otherwise a UserError naming the tap."""
    if tensor.dim() != 4:
        raise UserError(
            f"loss {loss!r} reads feature maps [N, C, H, W], but the {role}'s tap {tap!r} has shape {tuple(tensor.shape)}",
            fix=fix,
        )
    return tensor


def conv1x1(in_channels: int, out_channels: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, bias=bias)


def stage_taps(output: ModelOutput, family: str, loss: str, role: str) -> list[str]:
    """The names ``<family>.1`` … ``<family>.K`` present in ``output``, in stage order
    (``feat.0``, the stem, is not a stage); none is an error naming the tap."""
    stages = sorted((int(m.group(2)), name) for name in output.features
                    if (m := _STAGE.fullmatch(name)) and m.group(1) == family and int(m.group(2)) >= 1)
    if not stages:
        raise tap_error(loss, role, f"{family}.1", output)
    return [name for _, name in stages]


def tapped(output: ModelOutput, name: str, loss: str, role: str) -> torch.Tensor:
    if name not in output.features:
        raise tap_error(loss, role, name, output)
    return output.features[name]
