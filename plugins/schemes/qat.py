"""``qat-kd``: quantisation-aware distillation (docs/deploy.md).

Fine-tunes a trained fp32 student with fake quantisation (:mod:`.fake_quant`:
what ``pyramidkd export --quantize int8`` will do to it) while distilling from its
own fp32 weights or any teacher, with any loss of the zoo (default ``kd``) — the
remedy when post-training quantisation loses accuracy. The stage is one ordinary
stage: its model is the student's (same class, parameters, ``state_dict`` layout;
``init_from`` the student), so its checkpoint exports, loads and resumes like any.

How the fake quantiser rides along without a change to the engine: the stage's
model spec is a subclass of the student's model class (same ``name`` and
``Params``, so the checkpoint describes the plain model) whose ``build`` attaches
the quantiser; the loss spec is a subclass of the chosen loss class that owns the
quantiser's ranges (so ``last.pt`` saves them with the loss state and ``--resume``
restores them) and switches its phases in ``start_epoch``. The stage builds its
student before its loss (engine/training/state.py), which is how the loss finds the
quantiser its student's build made.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch

from pyramidkd.engine import (
    ComponentSpec, DatasetContext, RecipeError, Scheme, StageOutput, StagePlan, UserError, hookimpl, loss_taps,
    non_negative, open_unit, positive,
)
from pyramidkd.plugins.schemes.fake_quant import OBSERVERS, FakeQuantSettings, attach_fake_quant, quantised_layers

# Used where neither [train] nor [stages.train] sets them: a short fine-tune at a small
# learning rate (0.01x the quickstart's 0.05), from an already trained student.
DEFAULT_TRAIN = {"epochs": 3, "optimizer": {"lr": 5e-4}}


@attrs.define(kw_only=True)
class QATParams:
    student: str = attrs.field(metadata={
        "help": 'the trained fp32 student to fine-tune: an earlier stage id, e.g. "student-kd", or a checkpoint file; '
                "the stage's model is that model"})
    teacher: str = attrs.field(default="", metadata={
        "help": "an earlier stage id or a checkpoint file; default: the student itself (distilling from its fp32 weights)"})
    observer: Literal["minmax", "ema"] = attrs.field(default="minmax", metadata={
        "help": 'activation ranges: "minmax" (min/max of the training batches, as the export\'s MinMax calibration) '
                'or "ema" (their moving average)'})
    observer_epochs: int = attrs.field(default=1, validator=positive, metadata={
        "help": "epochs during which the activation ranges are observed; frozen afterwards"})
    freeze_bn_epochs: int = attrs.field(default=1, validator=non_negative, metadata={
        "help": "epochs during which BatchNorm statistics update; afterwards (0: from the start) the running statistics "
                "are used, as the int8 model folds them"})
    ema_constant: float = attrs.field(default=0.01, validator=open_unit, metadata={
        "help": 'averaging constant of observer = "ema"'})

    def settings(self) -> FakeQuantSettings:
        return FakeQuantSettings(self.observer, self.observer_epochs, self.freeze_bn_epochs, self.ema_constant)


class QuantizerLink:
    """Hands the quantiser a stage's model build attached to the loss built next."""

    def __init__(self, settings: FakeQuantSettings):
        self.settings = settings
        self.pending = None

    def take(self):
        quantizer, self.pending = self.pending, None
        return quantizer


class QATKDScheme(Scheme):
    """Quantisation-aware distillation: fine-tune a trained student with int8 fake quantisation."""

    name = "qat-kd"
    Params = QATParams

    def plan(self, entry, context):
        p, key = self.params, f"{entry.key}.scheme"
        if entry.model is not None:
            raise RecipeError("scheme 'qat-kd' fine-tunes the student's own model", key=f"{entry.key}.model",
                              fix=f'remove [stages.model]: the model is the one of student = "{p.student}"')
        if p.observer_epochs > entry.train.epochs:
            raise RecipeError(f"observer_epochs = {p.observer_epochs} is more than the stage's {entry.train.epochs} epochs, "
                              "so the ranges would never be frozen", key=f"{key}.observer_epochs",
                              fix=f"set observer_epochs to at most {entry.train.epochs} (e.g. 1)")
        student = context.model_source(p.student, f"{key}.student")
        teacher = context.model_source(p.teacher, f"{key}.teacher") if p.teacher else student
        base = student_model(context, student, f"{key}.student")
        check_quantisable(context, base, entry.id, f"{key}.student")
        link = QuantizerLink(p.settings())
        loss = entry.loss or context.component("loss", "kd", key=f"{entry.key}.loss")
        student_taps, teacher_taps = loss_taps(loss)
        settings = attrs.asdict(p.settings())
        return [StagePlan(
            id=entry.id,
            model=ComponentSpec(fake_quant_model_class(base.cls, link), base.params, base.key),
            loss=ComponentSpec(fake_quant_loss_class(loss.cls, link), params_with(loss.params, settings), loss.key),
            train=context.train(entry, DEFAULT_TRAIN),
            teachers=[teacher] if loss.cls.needs_teacher else [],
            init_from=student,
            student_taps=student_taps,
            teacher_taps=teacher_taps,
            info={"method": "qat-kd", "student": p.student, "teacher": p.teacher or p.student, "fake_quant": settings},
        )]


# --- planning helpers -------------------------------------------------------------


def student_model(context, source, key: str) -> ComponentSpec:
    """The plain model spec (class and validated parameters) behind the student."""
    if isinstance(source, StageOutput):
        spec = next(stage.model for stage in context.stages if stage.id == source.stage_id)
        return ComponentSpec(getattr(spec.cls, "plain_model", spec.cls), spec.params, key)
    model = context.model_of(source, key)
    return context.component("model", model.name, model.params, key)


def check_quantisable(context, spec: ComponentSpec, stage_id: str, key: str) -> None:
    """Refuse, before anything trains, a student with no layer int8 export quantises
    (built on the meta device; a model that cannot be is checked when the stage builds it)."""
    shape, classes = data_shape(context)
    try:
        with torch.device("meta"):
            model = spec.instantiate().build(classes, shape)
    except UserError as error:
        raise RecipeError(f"stage {stage_id!r}: {error.message}", key=key, fix=error.fix) from None
    except Exception:  # the meta device cannot build it: the stage's own build checks
        return
    if not quantised_layers(model):
        raise RecipeError(f"stage {stage_id!r}: the student model {spec.name!r} has no nn.Conv2d or nn.Linear layer, so int8 "
                          "export would quantise nothing", key=key, fix="use qat-kd on a model built from Conv2d/Linear layers")


def data_shape(context) -> tuple[tuple[int, ...], int]:
    """The dataset's input shape and class count where it tells them unloaded (else a CIFAR-like guess: layer types do
    not depend on the image size)."""
    raw = context.recipe.dataset
    try:
        dataset = context.component("dataset", raw.name, raw.params, key=raw.key).instantiate()
        shape = dataset.data_shape(DatasetContext(seed=0, recipe_dir=context.recipe.directory, cache_dir=""))
    except Exception:  # the dataset reports its own errors when it loads
        shape = None
    return (tuple(shape.input_shape), shape.num_classes) if shape is not None else ((3, 32, 32), 10)


# --- the stage's model and loss classes ---------------------------------------------


def fake_quant_model_class(base: type, link: QuantizerLink) -> type:
    """``base`` (a Model class) whose built network computes with the fake quantiser."""

    class FakeQuantModel(base):
        plain_model = base

        def build(self, num_classes: int, input_shape: tuple[int, ...]):
            # init_from replaces the weights: never fetch pretrained ones (torchvision, timm)
            build = getattr(super(), "build_for_checkpoint", None) or super().build
            net = build(num_classes, input_shape)
            link.pending = attach_fake_quant(net, link.settings, f"model {base.name!r}")
            return net

    FakeQuantModel.__name__ = FakeQuantModel.__qualname__ = f"FakeQuant{base.__name__}"
    return FakeQuantModel


def fake_quant_loss_class(base: type, link: QuantizerLink) -> type:
    """``base`` (a Loss class) that owns the quantiser's ranges and sets its phase each epoch."""

    class FakeQuantLoss(base):
        def __init__(self, params: Any = None):
            super().__init__(params)
            self.fake_quant = link.take()  # None outside a stage build (validation, planning)

        def start_epoch(self, epoch: int) -> None:
            super().start_epoch(epoch)
            if self.fake_quant is None:
                raise RuntimeError("qat-kd: the loss was built without its student's fake quantiser")
            self.fake_quant.start_epoch(epoch)

    FakeQuantLoss.__name__ = FakeQuantLoss.__qualname__ = f"FakeQuant{base.__name__}"
    return FakeQuantLoss


_PARAMS_CLASSES: dict[type, type] = {}


def params_with(params: Any, settings: dict) -> Any:
    """``params`` (an attrs instance) plus a ``fake_quant`` field holding ``settings``: the
    loss's own code reads its fields as before, and the fake quantiser's settings enter
    the stage's fingerprint (changing them recomputes the stage)."""
    base = type(params)
    if base not in _PARAMS_CLASSES:
        _PARAMS_CLASSES[base] = attrs.make_class(
            f"FakeQuant{base.__name__}", {"fake_quant": attrs.field(factory=dict, kw_only=True)}, bases=(base,), slots=True)
    values = {field.alias: getattr(params, field.name) for field in attrs.fields(base) if field.init}
    return _PARAMS_CLASSES[base](**values, fake_quant=dict(settings))


@hookimpl
def pyramidkd_register_schemes():
    return [QATKDScheme]
