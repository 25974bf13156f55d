"""``scratch`` (cross-entropy only) and ``kd`` (one teacher -> one student).

``kd`` runs any loss on any pair of models: the stage taps exactly what its loss
declares (``Loss.student_taps()`` / ``teacher_taps()``, e.g. ``feat.*``), resolved
through each model's ``tap_points()``; a logit-only loss (``kd``, ``ce``) taps
nothing, so its stage registers no forward hook.
"""

from __future__ import annotations

import attrs

from pyramidkd.engine import Scheme, StagePlan, hookimpl, loss_taps


@attrs.define
class ScratchParams:
    init_from: str = attrs.field(default="", metadata={"help": "a stage id or .pt file whose matching layers initialise the model"})


class ScratchScheme(Scheme):
    """Train one model with its loss (default ``ce``) and no teacher."""

    name = "scratch"
    Params = ScratchParams

    def plan(self, entry, context):
        loss = entry.loss or context.component("loss", "ce", key=f"{entry.key}.loss")
        init = context.model_source(self.params.init_from, f"{entry.key}.scheme.init_from") if self.params.init_from else None
        return [StagePlan(id=entry.id, model=entry.require_model(), loss=loss, train=context.train(entry), init_from=init)]


@attrs.define
class KDSchemeParams:
    teacher: str = attrs.field(metadata={"help": 'an earlier stage id, e.g. "teacher", or a checkpoint file (.pt)'})
    init_from: str = attrs.field(default="", metadata={"help": "a stage id or .pt file whose matching layers initialise the student"})


class KDScheme(Scheme):
    """Distil one teacher into one student (loss default ``kd``: Hinton KD + CE)."""

    name = "kd"
    Params = KDSchemeParams

    def plan(self, entry, context):
        teacher = context.model_source(self.params.teacher, f"{entry.key}.scheme.teacher")
        loss = entry.loss or context.component("loss", "kd", key=f"{entry.key}.loss")
        init = context.model_source(self.params.init_from, f"{entry.key}.scheme.init_from") if self.params.init_from else None
        student_taps, teacher_taps = loss_taps(loss)
        return [
            StagePlan(
                id=entry.id,
                model=entry.require_model(),
                loss=loss,
                train=context.train(entry),
                teachers=[teacher],
                init_from=init,
                student_taps=student_taps,
                teacher_taps=teacher_taps,
            )
        ]


@hookimpl
def pyramidkd_register_schemes():
    return [ScratchScheme, KDScheme]
