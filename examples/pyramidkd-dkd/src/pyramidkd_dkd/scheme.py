"""The ``nkd`` scheme: one teacher -> one student, trained with the ``nkd`` loss.

It plans exactly what the built-in ``kd`` scheme plans (one stage, the teacher an
earlier stage or a checkpoint file), but its default loss is ``nkd`` instead of
Hinton's ``kd``; a ``[stages.loss]`` table still chooses another loss or sets
the nkd parameters. Only the public plugin API is used.
"""

from __future__ import annotations

import attrs

from pyramidkd.engine import Scheme, StagePlan


@attrs.define
class NKDSchemeParams:
    teacher: str = attrs.field(metadata={"help": 'an earlier stage id, e.g. "teacher", or a checkpoint file (.pt)'})
    init_from: str = attrs.field(default="", metadata={"help": "a stage id or .pt file whose matching layers initialise the student"})


class NKDScheme(Scheme):
    """Distil one teacher into one student with Normalized KD (loss default ``nkd``)."""

    name = "nkd"
    Params = NKDSchemeParams

    def plan(self, entry, context):
        teacher = context.model_source(self.params.teacher, f"{entry.key}.scheme.teacher")
        loss = entry.loss or context.component("loss", "nkd", key=f"{entry.key}.loss")
        init = context.model_source(self.params.init_from, f"{entry.key}.scheme.init_from") if self.params.init_from else None
        return [
            StagePlan(
                id=entry.id,
                model=entry.require_model(),
                loss=loss,
                train=context.train(entry),
                teachers=[teacher],
                init_from=init,
                info={"scheme": "nkd"},
            )
        ]
