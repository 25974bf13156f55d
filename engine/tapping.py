"""Planning and checking a stage's taps (the feature-tap contract).

:func:`loss_taps` gives the taps a loss declares (``Loss.student_taps()`` /
``teacher_taps()``) as specs a scheme puts in its :class:`StagePlan`
(``{"feat.2": "@feat.2"}``, see :mod:`.training.taps`); a plain KD loss declares
none, so its stage registers no hook. :func:`check_stage_taps` (run by ``validate``
and again before training) builds every stage's models on the meta device and runs
them at the data set's image size with the stage's taps.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

from .components import CheckpointFile, ComponentSpec, DataShape, Loss, StageOutput, StagePlan
from .errors import RecipeError, UserError
from .training.taps import hook_targets, resolve_taps, tap_point
from .validation import Structurer


def loss_taps(loss: ComponentSpec | Loss) -> tuple[dict[str, str], dict[str, str]]:
    """(student taps, teacher taps) a loss reads, as ``{name: "@name"}``: what a
    scheme puts in its :class:`StagePlan` to give the loss its features."""
    instance = loss.instantiate() if isinstance(loss, ComponentSpec) else loss
    return ({name: tap_point(name) for name in instance.student_taps()},
            {name: tap_point(name) for name in instance.teacher_taps()})


# --- validation: before anything trains ------------------------------------------


def check_stage_taps(stages: list[StagePlan], shape: DataShape, resolver: Any) -> None:
    """Build every stage's models on the meta device and run them at the data
    set's image size with the stage's taps: a model that cannot take that size, a
    tap path or point a model lacks, a loss reading a tap its stage does not record,
    and feature maps the loss cannot compare are refused, naming the stage and the fix."""
    try:
        _check_stages(stages, shape, resolver)
    except RecipeError as error:
        error.file = error.file or resolver.recipe.file
        raise


def _check_stages(stages: list[StagePlan], shape: DataShape, resolver: Any) -> None:
    plans = {stage.id: stage for stage in stages}
    cache: dict[str, Any] = {}
    for stage in stages:
        loss = stage.loss.instantiate()
        student = _meta_outputs(stage.model, stage.student_taps, "student", stage, shape, cache)
        teachers = [_meta_outputs(_source_spec(source, plans, resolver), stage.teacher_taps, "teacher", stage, shape, cache)
                    for source in stage.teachers]
        if student is None or any(t is None for t in teachers):
            continue  # a model the meta device cannot run: checked when the stage builds it
        _check_reads(loss, "student", loss.student_taps(), student, stage)
        for teacher in teachers:
            _check_reads(loss, "teacher", loss.teacher_taps(), teacher, stage)
            try:
                loss.check_features(_tensors(student), _tensors(teacher))
            except UserError as error:
                raise RecipeError(f"stage {stage.id!r}: {error.message}", key=stage.loss.key or None, fix=error.fix) from None


def _source_spec(source, plans: dict[str, StagePlan], resolver) -> ComponentSpec | None:
    if isinstance(source, StageOutput):
        return plans[source.stage_id].model if source.stage_id in plans else None
    assert isinstance(source, CheckpointFile)
    model = resolver.checkpoint_model(source)
    return ComponentSpec(model.cls, Structurer(source.path).structure(model.cls.Params, model.params, "model"), source.key)


@attrs.define
class MetaModel:
    """A model built on the meta device and the shapes its one meta forward pass saw:
    module path -> (per-sample input shape, per-sample output shape); ``None`` where
    the value is not a tensor."""

    model: nn.Module
    shapes: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]]


def _meta_outputs(spec: ComponentSpec | None, taps: dict[str, str], role: str, stage: StagePlan, shape: DataShape,
                  cache: dict) -> dict[str, tuple[int, ...] | None] | None:
    """Per-sample shapes of the stage's tapped tensors on ``spec``'s model (``None``:
    the model cannot be checked on the meta device). Every tap is resolved as the
    training run resolves it, so a missing module or point is refused here."""
    meta = _meta_model(spec, role, stage, shape, cache) if spec is not None else None
    if meta is None:
        return None
    try:
        resolved = resolve_taps(meta.model, taps, role=role, stage_id=stage.id, model_name=spec.name)
        targets = hook_targets(meta.model, resolved, role=role, stage_id=stage.id, model_name=spec.name)
    except RecipeError as error:
        error.key = error.key or spec.key or None
        raise
    paths = {id(module): path for path, module in meta.model.named_modules()}
    return {name: meta.shapes.get(paths[id(module)], (None, None))[0 if want_input else 1] for name, module, want_input in targets}


def _meta_model(spec: ComponentSpec, role: str, stage: StagePlan, shape: DataShape, cache: dict) -> MetaModel | None:
    """Build ``spec``'s model on the meta device and run it once (cached per model)."""
    key = f"{spec.name}:{sorted(_params(spec).items())}"
    if key not in cache:
        try:
            with torch.device("meta"):
                model = spec.instantiate().build(shape.num_classes, tuple(shape.input_shape))
        except UserError as error:
            raise RecipeError(f"stage {stage.id!r} ({role}): {error.message}", key=spec.key or None, fix=error.fix) from None
        except (NotImplementedError, RuntimeError, ValueError, TypeError):
            model = None  # it cannot be built on the meta device: nothing to check here
        cache[key] = _meta_forward(model, spec, role, stage, shape) if model is not None else None
    return cache[key]


def _meta_forward(model: nn.Module, spec: ComponentSpec, role: str, stage: StagePlan, shape: DataShape) -> MetaModel | None:
    shapes: dict = {}

    def per_sample(value):
        return tuple(value.shape[1:]) if isinstance(value, torch.Tensor) else None

    def record(path):
        return lambda module, inputs, output: shapes.__setitem__(path, (per_sample(inputs[0]) if inputs else None, per_sample(output)))

    handles = [module.register_forward_hook(record(path)) for path, module in model.named_modules()]
    try:
        with torch.no_grad():
            model.eval()(torch.empty((2, *shape.input_shape), device="meta"))
    except NotImplementedError:
        return None  # an operation without a meta kernel
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        if _not_checkable(error):
            return None
        raise _size_error(spec, role, stage, shape, error) from None
    finally:
        for handle in handles:
            handle.remove()
    return MetaModel(model, shapes)


def _params(spec: ComponentSpec) -> dict:
    try:
        return {k: repr(v) for k, v in spec.as_dict().items()}
    except Exception:  # a Params class that is not attrs: no cache sharing
        return {"id": repr(id(spec))}


def _not_checkable(error: Exception) -> bool:
    """Failures of the meta device itself (a model mixing devices, reading values)."""
    text = str(error).lower()
    return "meta" in text or "device" in text or "data-dependent" in text


def _size_error(spec: ComponentSpec, role: str, stage: StagePlan, shape: DataShape, error: Exception) -> RecipeError:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    size = "×".join(str(n) for n in shape.input_shape)
    return RecipeError(
        f"stage {stage.id!r}: the {role} model {spec.name!r} cannot take {size} images: {first}",
        key=spec.key or None,
        fix="give the data set an image size the model's pooling can take (e.g. image_size = 32), or use a model made for this size",
    )


def _check_reads(loss: Loss, role: str, names: tuple[str, ...], recorded: dict, stage: StagePlan) -> None:
    for name in names:
        if name.endswith(".*"):
            found = any(k.startswith(name[:-1]) for k in recorded)
        else:
            found = name in recorded or any(k.startswith(name + ".") for k in recorded)
        if not found:
            have = ", ".join(recorded) or "nothing"
            raise RecipeError(
                f"stage {stage.id!r}: loss {loss.name!r} reads the {role}'s tap {name!r}, but the stage taps {have}",
                key=stage.loss.key or None,
                fix=f"use loss {loss.name!r} with the kd scheme, which taps what the loss reads (feat.k, preact.k, pooled), "
                "or with a scheme that taps it; or pick a loss that reads what this scheme taps",
            )


def _tensors(shapes: dict) -> dict[str, tuple[int, ...]]:
    return {name: value for name, value in shapes.items() if value is not None}
