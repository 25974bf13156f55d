"""Feature-hint baselines of the Pyramid study, level by level, directly from one teacher.

``fitnet``      per level, directly from the teacher (not chained): a hint stage — the
                level's layers up to its guided layer learn the teacher's hint layer
                through the ``hint`` loss (a 1×1-conv regressor where channels differ,
                the larger map pooled to the smaller) — then stage 2 (every layer, the
                entry's loss). Any teacher: ``hint_layer`` names a point of the tap
                contract (``feat.k`` / ``preact.k``, the same name on the level), tapped
                through each model's ``tap_points()``; left empty it is ``feat.2`` —
                or, for a Pyramid-family teacher (vgg19, svgg*), the study's conv4_2
                (``block4.relu4_2``; the level's own, or its ``block4_c.relu4_c``).
``gram-direct`` per level, directly from the VGG19 teacher: Gram (FSP) matching of every
                compressed block's input→output flow, then stage 2.

Both build one SVGG level model per level from ``width``, ``batch_norm`` and
``dropout`` (as the Pyramid schemes do); the levels are the Pyramid's, in any order.
The hint stage taps the chosen layer as ``hint`` (and as ``out``, so that
``stage1_loss = "mse"`` matches the same layers), keeps the checkpoint with the lowest
validation stage loss, and trains only the layers up to the guided layer.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from pyramidkd.engine import FieldValueError, RecipeError, Scheme, StageOutput, StagePlan, hookimpl
from pyramidkd.plugins.models.pyramid import PyramidModel
from pyramidkd.plugins.schemes.pyramid import (
    LEVEL_NAMES, STAGE1_LOSS_HELP, PyramidForwardParams, Teacher, check_compatible, check_levels, hint_and_train,
    level_model, refuse_model_section, resolve_teacher, stage1_loss_spec, stage1_train, stage2_loss,
)

HINT_POINT = re.compile(r"(?:feat|preact)\.\d+")
DEFAULT_HINT_LAYER = "feat.2"  # FitNet's "middle" layer: CRD's hint_layer = 2


def _hint_layer(instance, attribute, value):
    if value and not HINT_POINT.fullmatch(value):
        raise FieldValueError(f"must be a stage output such as \"feat.2\" or \"preact.3\", got {value!r}",
                              'set hint_layer = "feat.2" (or leave it empty for the default)')


@attrs.define(kw_only=True)
class GramDirectParams(PyramidForwardParams):
    stage1_loss: str | dict[str, Any] = attrs.field(default="gram", metadata={"help": STAGE1_LOSS_HELP})


@attrs.define(kw_only=True)
class FitNetParams(PyramidForwardParams):
    teacher: str = attrs.field(metadata={"help": 'any teacher: an earlier stage id, e.g. "teacher", or a checkpoint file (.pt)'})
    stage1_loss: str | dict[str, Any] = attrs.field(default="hint", metadata={"help": STAGE1_LOSS_HELP})
    inherit: bool = attrs.field(default=False, metadata={"help": "initialise each level from the teacher's shared layers (FitNet: no; Pyramid teachers only)"})
    hint_layer: str = attrs.field(default="", validator=_hint_layer, metadata={"since": "0.3.0",
        "help": 'the teacher\'s hint layer and the level\'s guided layer, a tap point, e.g. "feat.2"; '
        'default: VGG19\'s conv4_2 for a Pyramid teacher, "feat.2" otherwise'})


def fitnet_loss(context, entry, params):
    """The hint stage's loss; a loss with a ``hint_layer`` reads the layer this scheme taps as ``hint``."""
    spec = stage1_loss_spec(context, entry, params)
    if "hint_layer" not in attrs.fields_dict(spec.cls.Params):
        return spec
    table = {} if isinstance(params.stage1_loss, str) else {k: v for k, v in params.stage1_loss.items() if k != "name"}
    for name in ("hint_layer", "guided_layer"):
        if name in table:
            raise RecipeError(
                f"scheme 'fitnet' chooses the hint layer itself; {name} in stage1_loss is not used",
                key=f"{entry.key}.scheme.stage1_loss.{name}",
                fix=f"remove it and set hint_layer = {table[name]!r} in [stages.scheme]",
            )
    return context.component("loss", spec.name, {**table, "hint_layer": "hint"}, key=f"{entry.key}.scheme.stage1_loss")


def contract_hint_stages(context, entry, params, level: str, teacher: Teacher, layer: str, loss) -> list[StagePlan]:
    """A level's FitNet stages against the teacher's tap point ``layer`` (any teacher)."""
    model = level_model(context, entry, level, params)
    points = model.cls.contract_points()
    if layer not in points:
        raise RecipeError(f"scheme 'fitnet': the level {level!r} has no tap point {layer!r}; it declares {', '.join(points)}",
                          key=f"{entry.key}.scheme.hint_layer", fix='use a point the level and the teacher both have, e.g. "feat.2"')
    taps = {"hint": f"@{layer}", "out": f"@{layer}"}
    guided = points[layer].partition(":")[0]
    hint_id = f"{entry.id}.{level}.hint"
    shared = getattr(teacher.cls, "blocks", ())
    info = {"level": level, "teacher_model": teacher.cls.name, "new_blocks": [b for b in model.cls.blocks if b not in shared]}
    final_loss = stage2_loss(context, entry)
    return [
        StagePlan(id=hint_id, model=model, loss=loss, train=stage1_train(context, entry, params), teachers=[teacher.source],
                  init_from=teacher.source if params.inherit else None, trainable=model.cls.layers_up_to(guided), student_taps=taps, teacher_taps=dict(taps), select="val_loss",
                  info={**info, "step": "hint", "matched": f"hint: {layer} ({guided}) ~ teacher {layer}"}),
        StagePlan(id=f"{entry.id}.{level}", model=model, loss=final_loss, train=context.train(entry, epochs=params.epochs_of(level)),
                  teachers=[teacher.source] if final_loss.cls.needs_teacher else [], init_from=StageOutput(hint_id),
                  info={**info, "step": "train", "taught_by": teacher.reference}),
    ]


class DirectLevelScheme(Scheme):
    """Per level, directly from one teacher (not chained); subclasses plan a level's stages."""

    pyramid_teachers_only = True  # refuse teachers outside the Pyramid family

    def plan(self, entry, context):
        p = self.params
        refuse_model_section(entry, self.name)
        check_levels(p.levels, LEVEL_NAMES, entry, self.name, ordered=False)
        teacher = resolve_teacher(context, p.teacher, f"{entry.key}.scheme.teacher", self.name, pyramid=self.pyramid_teachers_only)
        level_stages = self.level_planner(entry, context, teacher)
        return [stage for level in p.levels for stage in level_stages(level)]

    def level_planner(self, entry, context, teacher: Teacher):
        """Check what the levels share, then return ``level -> [StagePlan, ...]``."""
        raise NotImplementedError


class FitNetScheme(DirectLevelScheme):
    """FitNet per level, directly from any teacher: hint stage on a tap point (VGG19: conv4_2), then training."""

    name = "fitnet"
    Params = FitNetParams
    pyramid_teachers_only = False

    def level_planner(self, entry, context, teacher):
        p = self.params
        pyramid_teacher = isinstance(teacher.cls, type) and issubclass(teacher.cls, PyramidModel)
        if p.inherit and not pyramid_teacher:
            raise RecipeError(
                f"scheme 'fitnet': inherit = true copies the layers a level shares with its teacher, but the teacher "
                f"{p.teacher!r} is a {teacher.cls.name!r} model, which shares none with an SVGG level",
                key=f"{entry.key}.scheme.inherit", fix="set inherit = false (FitNet's own setting)")
        if p.inherit:
            check_compatible(teacher, p, entry, self.name)
        loss = fitnet_loss(context, entry, p)
        layer = p.hint_layer or ("" if pyramid_teacher else DEFAULT_HINT_LAYER)
        if layer:
            return lambda level: contract_hint_stages(context, entry, p, level, teacher, layer, loss)
        return lambda level: hint_and_train(context, entry, p, level, teacher, scheme=self.name, hint_loss=loss, fitnet=True)


class GramDirectScheme(DirectLevelScheme):
    """Per level, Gram (FSP) matching of every compressed block directly against VGG19, then training."""

    name = "gram-direct"
    Params = GramDirectParams

    def level_planner(self, entry, context, teacher):
        check_compatible(teacher, self.params, entry, self.name, batch_norm=self.params.inherit)
        return lambda level: hint_and_train(context, entry, self.params, level, teacher, scheme=self.name)


@hookimpl
def pyramidkd_register_schemes():
    return [FitNetScheme, GramDirectScheme]
