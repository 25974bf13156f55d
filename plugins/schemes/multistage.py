"""Methods that train in two stages, planned from one ``[[stages]]`` entry (as the
Pyramid and FitNet schemes plan their hint stages).

``ab``  Activation boundaries (Heo et al. 2019). ``<entry>.init``: ``init_epochs`` (30)
        epochs of the initialisation loss (``[stages.loss]``, default ``ab`` with
        ``ce_weight = 0``: the AB term alone, as the references' ``init``) on the
        pre-activations; trains the student's layers up to its last tapped stage and the
        loss's connectors, the classifier frozen. Then ``<entry>``: every layer, from the
        first stage's weights (``init_from``), with ``main``: ``"ce"`` (the CRD code base:
        ``-a 0 -b 1`` and no AB term after the init) or ``"kd"`` (the authors' code: KL at
        T = 3 summed over classes and averaged over the batch, no T², no CE — as ``kd``
        with ``temperature = 3``, ``kd_weight = 1/9``, ``ce_weight = 0``), or a loss table.
``ft``  Factor transfer (Kim et al. 2018). ``<entry>.paraphraser``: ``init_epochs`` (30)
        epochs of ``ft-paraphraser``, the paraphraser learning to reconstruct the teacher's
        feat.K; the student is not trained there (its ``trainable`` list is empty: only
        the loss's paraphraser trains; the stage still runs the student, whose accuracy it
        reports, and keeps its last epoch). Then ``<entry>``: the student with ``ft``
        (``[stages.loss]``, default ``ft``), the paraphraser loaded from the first stage's
        ``last.pt`` (its loss state, through ``Loss.inherit_state``) and frozen;
        ``init_from`` the first stage, which also makes the second depend on it (a changed
        paraphraser stage recomputes both).

Both first stages run at a constant learning rate (the references' ``init`` has no
schedule) with the entry's other [train] settings; ``init_train`` overrides [train] keys
for that stage only (RepDistiller used lr 0.01 for FT's paraphraser with ResNet and WRN
students, the base lr 0.05 otherwise). A first stage keeps its last epoch (``select =
"last"``), as the references run their init epochs through.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch

from pyramidkd.engine import (
    DatasetContext, RecipeError, Scheme, StageOutput, StagePlan, UserError, hookimpl, loss_taps, positive,
)
from pyramidkd.plugins.losses.factors import FTLoss

NOMINAL_SHAPE = ((3, 32, 32), 10)  # for the module names only, where the dataset cannot tell its shape unloaded
AB_KD = {"temperature": 3.0, "kd_weight": 1.0 / 9.0, "ce_weight": 0.0}  # the authors' train_KD, in kd's terms


@attrs.define(kw_only=True)
class TwoStageParams:
    teacher: str = attrs.field(metadata={"help": 'an earlier stage id, e.g. "teacher", or a checkpoint file (.pt)'})
    init_epochs: int = attrs.field(default=30, validator=positive, metadata={"help": "epochs of the first stage (the references: 30)"})
    init_train: dict[str, Any] = attrs.field(factory=dict, metadata={
        "help": "[train] keys for the first stage only, e.g. { optimizer = { lr = 0.01 } } (default: constant learning rate)"})


@attrs.define(kw_only=True)
class ABSchemeParams(TwoStageParams):
    main: Literal["ce", "kd"] | dict[str, Any] = attrs.field(default="ce", metadata={
        "help": 'the main stage\'s loss: "ce" (CRD code base), "kd" (the authors: T = 3) or a table, e.g. { name = "kd", temperature = 4 }'})


def first_stage_train(context, entry, params):
    overrides = {"scheduler": {"name": "none"}, **params.init_train}
    return context.train(entry, overrides=overrides, epochs=params.init_epochs, key=f"{entry.key}.scheme.init_train")


def main_loss(context, entry, main):
    key = f"{entry.key}.scheme.main"
    if isinstance(main, str):
        return context.component("loss", "ce", {}, key) if main == "ce" else context.component("loss", "kd", dict(AB_KD), key)
    table = dict(main)
    if "name" not in table:
        raise RecipeError("required key is missing", key=f"{key}.name", fix='add name = "kd" (or "ce", "dkd", ...)')
    return context.component("loss", table.pop("name"), table, key)


def teacher_model_loss(entry, context, teacher: str, default_loss: str, defaults: dict):
    """A two-stage scheme's teacher, the entry's model and its first loss (the entry's, else ``default_loss``)."""
    source = context.model_source(teacher, f"{entry.key}.scheme.teacher")
    model = entry.require_model()
    return source, model, entry.loss or context.component("loss", default_loss, defaults, key=f"{entry.key}.loss")


class ABScheme(Scheme):
    """Activation boundaries: an initialisation stage on the pre-activations, then CE or KD."""

    name = "ab"
    Params = ABSchemeParams

    def plan(self, entry, context):
        p = self.params
        teacher, model, init_loss = teacher_model_loss(entry, context, p.teacher, "ab", {"ce_weight": 0.0})
        student_taps, teacher_taps = loss_taps(init_loss)
        init_id = f"{entry.id}.init"
        trainable = layers_before_taps(context, model, init_loss.instantiate().student_taps(), init_id, f"{entry.key}.model")
        final = main_loss(context, entry, p.main)
        info = {"teacher": p.teacher, "method": "ab"}
        return [
            StagePlan(id=init_id, model=model, loss=init_loss, train=first_stage_train(context, entry, p), teachers=[teacher],
                      trainable=trainable, student_taps=student_taps, teacher_taps=teacher_taps, select="last",
                      info={**info, "step": "init"}),
            StagePlan(id=entry.id, model=model, loss=final, train=context.train(entry),
                      teachers=[teacher] if final.cls.needs_teacher else [], init_from=StageOutput(init_id),
                      student_taps=loss_taps(final)[0], teacher_taps=loss_taps(final)[1], info={**info, "step": "train"}),
        ]


class FTScheme(Scheme):
    """Factor transfer: the paraphraser pre-trained on the teacher, then the student with ft."""

    name = "ft"
    Params = TwoStageParams

    def plan(self, entry, context):
        p = self.params
        teacher, model, loss = teacher_model_loss(entry, context, p.teacher, "ft", {})
        if not issubclass(loss.cls, FTLoss):
            raise RecipeError(f"scheme 'ft' trains a paraphraser for the loss, but loss {loss.name!r} does not continue one",
                              key=loss.key or f"{entry.key}.loss", fix='use [stages.loss] name = "ft" (or leave it out)')
        rate = getattr(loss.params, "rate", 0.5)
        paraphraser = context.component("loss", "ft-paraphraser", {"rate": rate}, key=f"{entry.key}.loss")
        first_id = f"{entry.id}.paraphraser"
        student_taps, teacher_taps = loss_taps(loss)
        info = {"teacher": p.teacher, "method": "ft"}
        return [
            StagePlan(id=first_id, model=model, loss=paraphraser, train=first_stage_train(context, entry, p), teachers=[teacher],
                      trainable=[], teacher_taps=loss_taps(paraphraser)[1], select="last", info={**info, "step": "paraphraser"}),
            StagePlan(id=entry.id, model=model, loss=loss, train=context.train(entry), teachers=[teacher],
                      init_from=StageOutput(first_id), student_taps=student_taps, teacher_taps=teacher_taps,
                      info={**info, "step": "train"}),
        ]


# --- what the initialisation stage trains: the layers up to the last tapped point ---------


def layers_before_taps(context, model, taps: tuple[str, ...], stage_id: str, key: str) -> list[str] | None:
    """Module prefixes of the student's parameters that run before its last tapped point
    (``preact.K`` for ``ab``): RepDistiller's ``get_feat_modules()``, found for any model
    by one forward pass on the meta device (module names do not depend on the image
    size). ``None`` (everything trains; the classifier gets no gradient from a feature
    loss anyway) for a model the meta device cannot run."""
    (channels_size, classes) = _data_shape(context)
    try:
        with torch.device("meta"):
            net = model.instantiate().build(classes, channels_size)
    except UserError as error:
        raise RecipeError(f"stage {stage_id!r}: {error.message}", key=key, fix=error.fix) from None
    except (NotImplementedError, RuntimeError, ValueError, TypeError):
        return None
    events = _tap_events(net, _tap_specs(net, taps, stage_id, key, model.name), channels_size)
    if events is None:
        return None
    ran_before, owners = events
    if all(path in ran_before for path in owners):
        return None
    return _prefixes(net, ran_before, owners)


def _data_shape(context) -> tuple[tuple[int, int, int], int]:
    raw = context.recipe.dataset
    try:
        dataset = context.component("dataset", raw.name, raw.params, key=raw.key).instantiate()
        shape = dataset.data_shape(DatasetContext(seed=0, recipe_dir=context.recipe.directory, cache_dir=""))
    except Exception:  # any failure here is the dataset's to report when it loads; the names do not need it
        shape = None
    return (tuple(shape.input_shape), shape.num_classes) if shape is not None else NOMINAL_SHAPE


def _tap_specs(net, taps: tuple[str, ...], stage_id: str, key: str, model_name: str) -> list[str]:
    points = net.tap_points() if callable(getattr(net, "tap_points", None)) else {}
    specs = []
    for tap in taps:
        family = tap[:-2] if tap.endswith(".*") else None
        found = [spec for name, spec in points.items() if family and name.startswith(family + ".") and name[len(family) + 1:].isdigit()
                 and int(name[len(family) + 1:]) >= 1] if family else [points[tap]] if tap in points else []
        if not found:
            wanted = f"{family}.1" if family else tap
            raise RecipeError(
                f"stage {stage_id!r}: the initialisation loss reads the student's tap {wanted!r}, but the model {model_name!r} "
                f"declares {', '.join(points) or 'no tap points'}",
                key=key, fix="use a student that declares pre-activation taps preact.1 … preact.K in tap_points() "
                "(the model zoo: resnet*, wrn_*, vgg*_bn, mobilenetv2, shufflenet*; vgg)")
        specs += found
    return specs


def _tap_events(net, specs: list[str], shape) -> tuple[set[str], dict[str, str]] | None:
    """The parameter-owning modules that finished before the last tapped point was reached."""
    order: list[tuple[str, str]] = []
    handles = []
    for path, module in net.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, i, path=path: order.append(("in", path))))
        handles.append(module.register_forward_hook(lambda m, i, o, path=path: order.append(("out", path))))
    try:
        with torch.no_grad():
            net.eval()(torch.empty((2, *shape), device="meta"))
    except Exception:  # a model the meta device cannot run: everything trains
        return None
    finally:
        for handle in handles:
            handle.remove()
    wanted = {("in", s.partition(":")[0]) if s.endswith(":input") else ("out", s) for s in specs}
    last = max(index for index, event in enumerate(order) if event in wanted)
    owners = {path: path for path, module in net.named_modules() if any(True for _ in module.parameters(recurse=False))}
    ran = {path for kind, path in order[:last] if kind == "out" and path in owners}
    return ran, owners


def _prefixes(net, ran: set[str], owners: dict[str, str], path: str = "") -> list[str]:
    """The fewest module prefixes covering exactly the parameter owners in ``ran``."""
    inside = [p for p in owners if p == path or p.startswith(path + ".") or not path]
    if inside and all(p in ran for p in inside):
        return [path] if path else []
    module = net.get_submodule(path) if path else net
    chosen = [f"{path}.{name}" for name, _ in module.named_parameters(recurse=False)] if path in ran else []
    for name, _ in module.named_children():
        chosen += _prefixes(net, ran, owners, f"{path}.{name}" if path else name)
    return chosen


@hookimpl
def pyramidkd_register_schemes():
    return [ABScheme, FTScheme]
