"""Pyramid chains and the baselines they are compared with.

``pyramid-forward`` / ``pyramid-backward``
    A chain over ``levels`` of the teacher's ladder (plugins/schemes/ladders.py: VGG19
    → SVGG…, the CIFAR ResNet and WRN depth ladders); each level is taught only by the
    level above it (the first by ``teacher``), in two steps:

    1. ``<entry>.<level>.hint`` — initialised from the teacher (weight inheritance:
       every shared layer is copied, only the compressed block starts random), the
       layers up to and including the compressed block learn to reproduce the
       teacher's output at the same depth (``stage1_loss``: ``mse`` on the block
       output, or ``gram`` on the block's input→output flow). Where the level adds no
       conv (svgg17 after vgg19; svgg5 after svgg8_b) it matches the teacher's logits
       (``mse-logits``) with every layer training. The checkpoint with the lowest
       validation stage loss is kept. A residual ladder compresses one stage per hint
       stage, ``<entry>.<level>.hint.<stage>``, each starting from the one before.
    2. ``<entry>.<level>`` — from stage 1's checkpoint, every layer trains with the
       entry's ``[stages.loss]`` (default ``ce``; ``kd`` distils from the level above).

    The best checkpoint of stage 2 is the next level's teacher.

``fitnet`` and ``gram-direct`` (per level, directly from one teacher) live in
:mod:`pyramidkd.plugins.schemes.hints` and use the helpers below.
``kd-chain``    teacher-assistant chain: one KD stage per level from the level above.
``ensemble``    one stage: KD from several teachers (``kd-ensemble`` loss).

VGG levels get ``width``, ``batch_norm`` and ``dropout`` from the scheme's own
parameters (a ``[stages.model]`` section is refused: the scheme builds one model
per level); a residual ladder's levels are the zoo's models as they are.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

import attrs

from pyramidkd.engine import ModelSource, RecipeError, Scheme, StageOutput, StagePlan, between, hookimpl, positive
from pyramidkd.plugins.models.pyramid import BACKWARD_LEVELS, FORWARD_LEVELS, MODELS, PyramidModel
from pyramidkd.plugins.schemes.ladders import (
    LADDERS, HintStep, check_same_ladder, describe_ladders, ladder_of, refuse_level_params, vgg_hint,
)

LEVEL_NAMES = tuple(name for name in MODELS if name != "vgg19")


# --- parameters -----------------------------------------------------------------


@attrs.define(kw_only=True)
class LevelModelParams:
    levels: list[str] = attrs.field(factory=lambda: list(FORWARD_LEVELS), metadata={"help": 'levels in chain order, e.g. ["svgg17", "svgg14"]'})
    width: float = attrs.field(default=1.0, validator=positive, metadata={"help": "channel multiplier of every level, e.g. 0.25 (must equal the teacher's)"})
    batch_norm: bool = attrs.field(default=False, metadata={"help": "BatchNorm in every level (must match the teacher)"})
    dropout: float = attrs.field(default=0.5, validator=between(0.0, 1.0))
    level_epochs: int | None = attrs.field(default=None, validator=positive, metadata={
        "help": "training epochs of every level before the last (default: the entry's train.epochs; the last level always trains those)"})

    def epochs_of(self, level: str, levels: list[str] | None = None) -> int | None:
        """A level's training epochs: ``level_epochs`` for all but the last of ``levels`` (default: ``self.levels``)."""
        return self.level_epochs if level != (levels or self.levels)[-1] else None


STAGE1_LOSS_HELP = 'stage-1 loss: a name ("mse", "gram", "hint") or a table, e.g. { name = "gram", pool = "max" }'


@attrs.define(kw_only=True)
class PyramidForwardParams(LevelModelParams):
    teacher: str = attrs.field(metadata={"help": 'the top of the chain (vgg19, resnet56, wrn_40_2, … a ladder level): an earlier stage id, e.g. "teacher", or a checkpoint file (.pt)'})
    levels: list[str] = attrs.field(factory=lambda: list(FORWARD_LEVELS), metadata={
        "help": 'levels below the teacher on its ladder, in chain order, e.g. ["svgg17", "svgg14"] or ["resnet32", "resnet20"] (default: the VGG19 chain)'})
    stage1_loss: str | dict[str, Any] = attrs.field(default="mse", metadata={"help": STAGE1_LOSS_HELP})
    stage1_epochs: int | None = attrs.field(default=None, validator=positive, metadata={"help": "epochs of stage 1 (default: the entry's train.epochs)"})
    stage1_train: dict[str, Any] = attrs.field(factory=dict, metadata={"help": "[train] keys overridden for stage 1 only, e.g. { optimizer = { lr = 0.01 } }"})
    inherit: bool = attrs.field(default=True, metadata={"help": "initialise each level from its teacher's shared layers (weight inheritance)"})


@attrs.define(kw_only=True)
class PyramidBackwardParams(PyramidForwardParams):
    levels: list[str] = attrs.field(factory=lambda: list(BACKWARD_LEVELS), metadata={"help": 'levels in chain order, e.g. ["svgg17_b", "svgg14_b"]'})


@attrs.define(kw_only=True)
class KDChainParams(LevelModelParams):
    teacher: str = attrs.field(metadata={"help": 'the first teacher: an earlier stage id or a checkpoint file (.pt)'})
    levels: list[str] = attrs.field(factory=lambda: list(FORWARD_LEVELS), metadata={"help": "students in chain order; each is taught by the one before"})
    inherit: bool = attrs.field(default=False, metadata={"help": "initialise each level from its teacher's shared layers"})


@attrs.define
class EnsembleParams:
    teachers: list[str] = attrs.field(metadata={"help": 'two or more earlier stage ids or .pt files, e.g. ["t1", "t2"]'})
    aggregate: Literal["mean-logits", "sum-kl"] | None = attrs.field(
        default=None, metadata={"help": "how the default kd-ensemble loss combines the teachers (default mean-logits)"}
    )
    init_from: str = attrs.field(default="", metadata={"help": "a stage id or .pt file whose matching layers initialise the student"})


# --- helpers ----------------------------------------------------------------------


@attrs.define
class Teacher:
    source: ModelSource
    cls: type
    params: dict
    reference: str


def resolve_teacher(context, reference: str, key: str, scheme: str, *, pyramid: bool = True) -> Teacher:
    model = context.model_of(reference, key)
    source, cls, params = model.source, model.cls, model.params
    if pyramid and not (isinstance(cls, type) and issubclass(cls, PyramidModel)):
        raise RecipeError(
            f"scheme {scheme!r} needs a Pyramid-family teacher (vgg19 or an svgg level), but {reference!r} is a {cls.name!r} model",
            key=key,
            fix='train the teacher with [stages.model] name = "vgg19"',
        )
    return Teacher(source, cls, params, reference)


def check_compatible(teacher: Teacher, params, entry, scheme: str, *, batch_norm: bool = True) -> None:
    """Feature matching and weight inheritance need the teacher's width (and batch norm)."""
    for name in ("width", "batch_norm") if batch_norm else ("width",):
        theirs = teacher.params.get(name)
        ours = getattr(params, name)
        if theirs is not None and theirs != ours:
            raise RecipeError(
                f"scheme {scheme!r}: the teacher {teacher.reference!r} ({teacher.cls.name}) has {name} = {_toml(theirs)}, the levels {name} = {_toml(ours)}",
                key=f"{entry.key}.scheme.{name}",
                fix=f"set {name} = {_toml(theirs)} in [stages.scheme] (shared layers and matched features need the same shapes)",
            )


def _toml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def refuse_model_section(entry, scheme: str) -> None:
    if entry.model is not None:
        raise RecipeError(
            f"scheme {scheme!r} builds one model per level itself; [stages.model] is not used",
            key=f"{entry.key}.model",
            fix="remove [stages.model]; put width / batch_norm / dropout in [stages.scheme]",
        )


def level_model(context, entry, level: str, params, ladder=LADDERS[0]):
    """The model of a level: a VGG level with the scheme's width / batch_norm / dropout, a residual one as it is."""
    name, model_params = ladder.level_model(level, params)
    return context.component("model", name, model_params, key=f"{entry.key}.scheme")


def check_levels(levels: list[str], allowed: tuple[str, ...], entry, scheme: str, *, ordered: bool = True) -> None:
    key = f"{entry.key}.scheme.levels"
    if not levels:
        raise RecipeError(f"scheme {scheme!r}: levels is empty", key=key, fix=f"list one or more of {', '.join(allowed)}")
    for index, level in enumerate(levels):
        if level not in allowed:
            close = difflib.get_close_matches(level, allowed, n=1)
            raise RecipeError(
                f"scheme {scheme!r}: unknown level {level!r}; levels: {', '.join(allowed)}",
                key=f"{key}[{index}]",
                fix=(f"did you mean {close[0]!r}? " if close else "") + "use the level names in chain order",
            )
    if len(set(levels)) != len(levels):
        raise RecipeError(f"scheme {scheme!r}: a level is listed twice", key=key, fix="list each level once")
    if ordered and [allowed.index(level) for level in levels] != sorted(allowed.index(level) for level in levels):
        raise RecipeError(
            f"scheme {scheme!r}: levels must follow the chain order {' → '.join(allowed)}",
            key=key,
            fix=f"reorder them: {', '.join(sorted(levels, key=allowed.index))}",
        )


def stage1_loss_spec(context, entry, params):
    value = params.stage1_loss
    key = f"{entry.key}.scheme.stage1_loss"
    value = {"name": value} if isinstance(value, str) else dict(value)
    if "name" not in value:
        raise RecipeError("required key is missing", key=f"{key}.name", fix='add name = "mse" (or "gram", "hint")')
    name = value.pop("name")
    if name == "hint":  # a hint stage taps the layers it matches as "out" (not the contract's feat.2)
        value.setdefault("hint_layer", "out")
    return context.component("loss", name, value, key)


def stage1_train(context, entry, params):
    """The entry's training settings, ``stage1_train`` over them, ``stage1_epochs`` last."""
    return context.train(entry, overrides=params.stage1_train, epochs=params.stage1_epochs, key=f"{entry.key}.scheme.stage1_train")


def stage2_loss(context, entry, default: str = "ce"):
    return entry.loss or context.component("loss", default, {}, key=f"{entry.key}.loss")


def fitnet_hint(student_cls, teacher_cls) -> HintStep:
    """FitNet's hint stage: the student's guided layer against the teacher's hint layer."""
    point, theirs = student_cls.points["hint"], teacher_cls.points["hint"]
    # "out" too, so that stage1_loss = "mse" also works on the hint layers
    return HintStep("hint", student_cls.layers_up_to(point), {"hint": point, "out": point}, {"hint": theirs, "out": theirs},
                    f"hint: {point} ~ teacher {theirs}", [b for b in student_cls.blocks if b not in teacher_cls.blocks])


def hint_and_train(context, entry, params, level: str, teacher: Teacher, *, scheme: str, hint_loss=None,
                   fitnet: bool = False) -> list[StagePlan]:
    """The two stages of one VGG level: a hint stage against ``teacher``, then training."""
    model = level_model(context, entry, level, params)
    if fitnet:
        hint = fitnet_hint(model.cls, teacher.cls)
    else:
        hint = vgg_hint(model.cls, teacher.cls, key=f"{entry.key}.scheme.teacher", teacher_name=teacher.reference)
    return level_stages(context, entry, params, level, model, teacher, [hint], hint_loss=hint_loss)


def level_stages(context, entry, params, level: str, model, teacher: Teacher, hints: list[HintStep], *,
                 hint_loss=None, levels: list[str] | None = None) -> list[StagePlan]:
    """A level's hint stage(s) against ``teacher``, each starting from the one before
    (the first from the teacher when ``inherit``), then one stage training every layer."""
    info = {"level": level, "teacher_model": teacher.cls.name, "new_blocks": hints[0].new_blocks}
    stages, start = [], teacher.source if params.inherit else None
    for hint in hints:
        if hint.match_logits:
            loss = context.component("loss", "mse-logits", {}, f"{entry.key}.scheme.stage1_loss")
        else:
            loss = hint_loss or stage1_loss_spec(context, entry, params)
        stage = StagePlan(
            id=f"{entry.id}.{level}.{hint.suffix}",
            model=model if hint.model is None else context.component("model", hint.model, hint.params, key=f"{entry.key}.scheme"),
            loss=loss,
            train=stage1_train(context, entry, params),
            teachers=[teacher.source],
            init_from=start,
            trainable=hint.trainable,
            student_taps=hint.student_taps,
            teacher_taps=hint.teacher_taps,
            select="val_loss",
            info={**info, "step": "hint", "matched": hint.matched},
        )
        stages.append(stage)
        start = StageOutput(stage.id)
    final_loss = stage2_loss(context, entry)
    stages.append(StagePlan(
        id=f"{entry.id}.{level}",
        model=model,
        loss=final_loss,
        train=context.train(entry, epochs=params.epochs_of(level, levels)),
        teachers=[teacher.source] if final_loss.cls.needs_teacher else [],
        init_from=start,
        info={**info, "step": "train", "taught_by": teacher.reference},
    ))
    return stages


# --- schemes ----------------------------------------------------------------------


def ladder_teacher(context, reference: str, key: str, scheme: str):
    """The teacher and the ladder it is a level of (the chain's family)."""
    teacher = resolve_teacher(context, reference, key, scheme, pyramid=False)
    ladder = ladder_of(teacher.cls.name)
    if ladder is None:
        raise RecipeError(
            f"scheme {scheme!r} needs a Pyramid-family teacher, a level of a model ladder ({describe_ladders()}), "
            f"but {reference!r} is a {teacher.cls.name!r} model",
            key=key,
            fix='train the teacher with [stages.model] name = "vgg19" (or a ladder\'s top, e.g. "resnet56", "wrn_40_2")',
        )
    return teacher, ladder


class PyramidForwardScheme(Scheme):
    """Pyramid chain from the output side: VGG19 → svgg17 → … → svgg5, or a ResNet / WRN depth ladder, last stage first."""

    name = "pyramid-forward"
    Params = PyramidForwardParams
    direction = "forward"

    def plan(self, entry, context):
        p = self.params
        refuse_model_section(entry, self.name)
        key = f"{entry.key}.scheme.teacher"
        teacher, ladder = ladder_teacher(context, p.teacher, key, self.name)
        chain = ladder.chain(self.direction)
        below = chain[chain.index(teacher.cls.name) + 1:] if teacher.cls.name in chain else ()
        check_same_ladder(p.levels, ladder, f"{entry.key}.scheme.levels", self.name, teacher=f"{p.teacher!r} ({teacher.cls.name})", below=below)
        check_levels(p.levels, chain[1:], entry, self.name)
        if teacher.cls.name not in chain or chain.index(teacher.cls.name) >= chain.index(p.levels[0]):
            raise RecipeError(
                f"scheme {self.name!r}: the teacher {p.teacher!r} is a {teacher.cls.name!r} model, not above the first level {p.levels[0]!r} "
                f"in the chain {' → '.join(chain)}",
                key=key,
                fix=f"use the {chain[0]} teacher (or a level above the first one listed)",
            )
        refuse_level_params(p, ladder, f"{entry.key}.scheme", self.name)
        check_compatible(teacher, p, entry, self.name, batch_norm=p.inherit)
        stages = []
        for level in p.levels:
            model = level_model(context, entry, level, p, ladder)
            hints = ladder.hints(model.cls, teacher.cls, self.direction, key=key, teacher_name=teacher.reference)
            planned = level_stages(context, entry, p, level, model, teacher, hints)
            stages += planned
            final = planned[-1]
            teacher = Teacher(StageOutput(final.id), final.model.cls, attrs.asdict(final.model.params), final.id)
        return stages


class PyramidBackwardScheme(PyramidForwardScheme):
    """Pyramid chain from the input side: VGG19 → svgg17_b → … → svgg8_b → svgg5, or a ResNet / WRN depth ladder, first stage first."""

    name = "pyramid-backward"
    Params = PyramidBackwardParams
    direction = "backward"


class KDChainScheme(Scheme):
    """Teacher-assistant chain: each level distilled (loss default kd) from the level above, one stage per level."""

    name = "kd-chain"
    Params = KDChainParams

    def plan(self, entry, context):
        p = self.params
        refuse_model_section(entry, self.name)
        ladder = (ladder_of(p.levels[0]) if p.levels else None) or LADDERS[0]
        check_same_ladder(p.levels, ladder, f"{entry.key}.scheme.levels", self.name)
        check_levels(p.levels, ladder.students(), entry, self.name, ordered=False)
        refuse_level_params(p, ladder, f"{entry.key}.scheme", self.name)
        teacher = context.model_source(p.teacher, f"{entry.key}.scheme.teacher")
        loss = stage2_loss(context, entry, default="kd")
        stages = []
        for level in p.levels:
            stage = StagePlan(
                id=f"{entry.id}.{level}",
                model=level_model(context, entry, level, p, ladder),
                loss=loss,
                train=context.train(entry, epochs=p.epochs_of(level)),
                teachers=[teacher] if loss.cls.needs_teacher else [],
                init_from=teacher if p.inherit else None,
                info={"level": level, "taught_by": getattr(teacher, "stage_id", None) or p.teacher},
            )
            stages.append(stage)
            teacher = StageOutput(stage.id)
        return stages


class EnsembleScheme(Scheme):
    """One student distilled from several teachers (loss default kd-ensemble: mean logits or summed KL)."""

    name = "ensemble"
    Params = EnsembleParams

    def plan(self, entry, context):
        p = self.params
        key = f"{entry.key}.scheme.teachers"
        if len(p.teachers) < 2:
            raise RecipeError(f"scheme 'ensemble' needs two or more teachers, got {len(p.teachers)}", key=key, fix='list them, e.g. teachers = ["t1", "t2"], or use scheme "kd" for one teacher')
        if len(set(p.teachers)) != len(p.teachers):
            raise RecipeError("a teacher is listed twice", key=key, fix="list each teacher once")
        teachers = [context.model_source(t, f"{key}[{i}]") for i, t in enumerate(p.teachers)]
        if entry.loss is None:
            loss = context.component("loss", "kd-ensemble", {"aggregate": p.aggregate or "mean-logits"}, key=f"{entry.key}.loss")
        else:
            loss = entry.loss
            theirs = getattr(loss.params, "aggregate", None)
            if p.aggregate is not None and theirs != p.aggregate:
                raise RecipeError(
                    f"scheme aggregate = {p.aggregate!r} but loss {loss.name!r} " + (f"has aggregate = {theirs!r}" if theirs else "does not aggregate that way"),
                    key=f"{entry.key}.scheme.aggregate",
                    fix='set aggregate in [stages.loss] (name = "kd-ensemble") only, or drop [stages.loss]',
                )
        init = context.model_source(p.init_from, f"{entry.key}.scheme.init_from") if p.init_from else None
        return [StagePlan(id=entry.id, model=entry.require_model(), loss=loss, train=context.train(entry), teachers=teachers, init_from=init)]


@hookimpl
def pyramidkd_register_schemes():
    return [PyramidForwardScheme, PyramidBackwardScheme, KDChainScheme, EnsembleScheme]
