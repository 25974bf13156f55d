"""From a validated recipe to the run prepared short of training.

One entry point, :func:`prepare_run`, returns a :class:`PreparedRun` (the stages
in order, the components, the notes). The flow runs one way:
:func:`~pyramidkd.engine.recipe.load_recipe` validated the host's keys; a
:class:`ComponentResolver` looks every component up in the plugin registries and
validates its parameters; each ``[[stages]]`` entry's scheme plans one or more
stages through a :class:`PlanContext`, which resolves references (``"teacher"``
names an earlier stage, or an earlier entry meaning its last stage; a path ending
in ``.pt`` names a checkpoint file); then the checks that need the whole plan.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import attrs

from .components import CheckpointFile, ComponentSpec, DatasetContext, DataShape, DataSplits, ModelSource, StageOutput, StagePlan
from .data.pipeline import run_pipeline
from .errors import CheckpointError, RecipeError, did_you_mean
from .recipe import RawComponent, Recipe, leaf_paths, lookup_key_path
from .registries import PluginHost
from .settings import TrainSection
from .shadowing import shadowed_overrides
from .training.checkpoints import load_checkpoint
from .tapping import check_stage_taps
from .validation import ErrorList

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")

log = logging.getLogger("pyramidkd")


@attrs.define(frozen=True)
class SourceModel:
    """The model behind a stage output or a checkpoint file.

    ``input_shape`` and ``num_classes`` are what a checkpoint was trained on
    (``None`` for a stage of this run: it trains on this run's data)."""

    cls: type
    params: dict[str, Any]
    source: ModelSource
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None

    @property
    def name(self) -> str:
        return self.cls.name


class ComponentResolver:
    """Looks components up in the plugin registries and validates their
    parameters: the one place a recipe's ``name = ...`` becomes a class."""

    def __init__(self, recipe: Recipe, registries: dict):
        self.recipe = recipe
        self._registries = registries
        self._checkpoints: dict[str, SourceModel] = {}

    def resolve(self, kind: str, raw: RawComponent) -> ComponentSpec:
        """A component the recipe names (``[stages.loss]``, ``[dataset]``, ...)."""
        key = raw.key if raw.shorthand else f"{raw.key}.name"
        cls = self._registries[kind].get(raw.name, file=self.recipe.file, key=key)
        params = self.recipe.structurer().structure(cls.Params, raw.params, raw.key)
        return ComponentSpec(cls, params, raw.key)

    def build(self, kind: str, name: str, params: dict | None, key: str) -> ComponentSpec:
        """A component a scheme chooses itself; ``key`` is where its choice comes from."""
        shorthand = not params and isinstance(lookup_key_path(self.recipe.data, key), str)
        return self.resolve(kind, RawComponent(name, dict(params or {}), key, shorthand=shorthand))

    def checkpoint_model(self, source: CheckpointFile) -> SourceModel:
        """The model a checkpoint file describes (read once per file)."""
        if source.path not in self._checkpoints:
            description = load_checkpoint(source.path).get("model") or {}
            cls = self._registries["model"].get(description.get("name"), file=self.recipe.file, key=source.key)
            shape = description.get("input_shape")
            self._checkpoints[source.path] = SourceModel(
                cls, dict(description.get("params") or {}), source, tuple(shape) if shape else None, description.get("num_classes")
            )
        return self._checkpoints[source.path]


@attrs.define
class StageEntry:
    """One ``[[stages]]`` entry as a scheme sees it (components and settings validated)."""

    id: str
    index: int
    key: str  # "stages[2]", for error messages
    scheme: ComponentSpec
    model: ComponentSpec | None
    loss: ComponentSpec | None
    train: TrainSection  # [train] with [stages.train] over it

    def require_model(self) -> ComponentSpec:
        if self.model is None:
            raise RecipeError(
                f"scheme {self.scheme.name!r} needs a model",
                key=f"{self.key}.model",
                fix='add [stages.model] with name = "..." (see `pyramidkd models`)',
            )
        return self.model


class PlanContext:
    """What a scheme may ask while planning (see :meth:`Scheme.plan`)."""

    def __init__(self, recipe: Recipe, resolver: ComponentResolver):
        self.recipe = recipe
        self._resolver = resolver
        self._stages: list[StagePlan] = []
        self._entry_outputs: dict[str, str] = {}  # entry id -> its last stage id

    @property
    def stages(self) -> tuple[StagePlan, ...]:
        """The stages planned so far (earlier entries, in order)."""
        return tuple(self._stages)

    # components and settings
    def component(self, kind: str, name: str, params: dict | None = None, key: str = "") -> ComponentSpec:
        """Build a component a scheme chooses itself (e.g. the default ``ce`` loss)."""
        return self._resolver.build(kind, name, params, key)

    def train(self, entry: StageEntry, defaults: dict | None = None, *, overrides: dict | None = None,
              epochs: int | None = None, key: str | None = None) -> TrainSection:
        """The entry's training settings: ``defaults`` (the scheme's) < ``[train]`` <
        ``[stages.train]`` < ``overrides`` (e.g. for one of several stages), and
        ``epochs`` last. ``key`` names where ``overrides`` and ``epochs`` come from
        (default ``<entry>.scheme``) in error messages."""
        key = key or f"{entry.key}.scheme"
        structurer = self.recipe.structurer()
        settings = entry.train
        if defaults:
            section = self.recipe.stages[entry.index]
            written = leaf_paths(self.recipe.data.get("train", {})) | leaf_paths(section.train_overrides)
            unset = _drop_paths(defaults, written)
            if unset:
                settings = structurer.evolve(settings, unset, key)
        if overrides:
            settings = structurer.evolve(settings, overrides, key)
        if epochs is not None:
            settings = structurer.evolve(settings, {"epochs": epochs}, key)
        return settings

    # references
    def model_source(self, reference: str, key: str) -> ModelSource:
        """Resolve a reference to an earlier stage, an earlier entry, or a ``.pt`` file."""
        if reference in self._entry_outputs:
            return StageOutput(self._entry_outputs[reference])
        if any(stage.id == reference for stage in self._stages):
            return StageOutput(reference)
        if reference.endswith(CHECKPOINT_SUFFIXES):
            path = reference if os.path.isabs(reference) else os.path.join(self.recipe.directory, reference)
            if not os.path.exists(path):
                raise RecipeError(
                    f"checkpoint file {reference!r} does not exist (looked at {path})",
                    file=self.recipe.file,
                    key=key,
                    fix="check the path (relative paths are relative to the recipe's folder)",
                )
            source = CheckpointFile(os.path.abspath(path), key)
            self._resolver.checkpoint_model(source)  # read (as data only) and checked now, before anything runs
            return source
        known = list(self._entry_outputs) + [s.id for s in self._stages if s.id not in self._entry_outputs]
        later = [s.id for s in self.recipe.stages if s.id == reference]
        if later:
            message = f"stage {reference!r} runs later in the recipe; a stage can only use stages before it"
            fix = "move the referenced stage earlier"
        else:
            message = f"refers to stage {reference!r}, which does not exist; earlier stages: {', '.join(known) or '(none)'}"
            fix = did_you_mean(reference, known) + "name an earlier stage id or a checkpoint file (.pt)"
        raise RecipeError(message, file=self.recipe.file, key=key, fix=fix)

    def model_of(self, source: ModelSource | str, key: str = "") -> SourceModel:
        """The model class and parameters behind an earlier stage, a checkpoint file,
        or a reference to either (resolved as :meth:`model_source` does, at ``key``)."""
        if isinstance(source, str):
            source = self.model_source(source, key)
        if isinstance(source, StageOutput):
            plan = next(s for s in self._stages if s.id == source.stage_id)
            return SourceModel(plan.model.cls, attrs.asdict(plan.model.params), source)
        return self._resolver.checkpoint_model(source)

    # the host's side
    def plan_entry(self, entry: StageEntry) -> list[StagePlan]:
        """Let the entry's scheme plan its stages; check and record them."""
        try:
            planned = list(entry.scheme.instantiate().plan(entry, self))
        except RecipeError as error:
            error.file = error.file or self.recipe.file
            raise
        if not planned:
            raise RecipeError(f"scheme {entry.scheme.name!r} planned no stages", file=self.recipe.file, key=entry.key,
                              fix="check the scheme's parameters")
        for plan in planned:
            plan.entry_id = plan.entry_id or entry.id
            if plan.loss.cls.needs_teacher and not plan.teachers:
                raise RecipeError(
                    f"loss {plan.loss.name!r} needs a teacher, but scheme {entry.scheme.name!r} gives stage {plan.id!r} none",
                    file=self.recipe.file,
                    key=plan.loss.key or f"{entry.key}.loss",
                    fix='use scheme "kd" with teacher = "<stage id>", or a loss without a teacher (e.g. "ce")',
                )
            if any(stage.id == plan.id for stage in self._stages):
                raise RecipeError(f"two stages are both named {plan.id!r}", file=self.recipe.file, key=plan.entry_id, fix="rename a stage")
            self._stages.append(plan)
        self._entry_outputs[entry.id] = planned[-1].id
        return planned


def check_components(recipe: Recipe, resolver: ComponentResolver) -> None:
    """Raise every error of the recipe's own components (names and parameters) at
    once, together with the recipe's deferred errors (:attr:`Recipe.problems`)."""
    errors = ErrorList()
    errors.errors += recipe.problems
    named = [("dataset", recipe.dataset)] + [("logger", raw) for raw in recipe.loggers]
    for section in recipe.stages:
        named += [(kind, raw) for kind, raw in (("scheme", section.scheme), ("model", section.model), ("loss", section.loss)) if raw]
    for kind, raw in named:
        errors.check(lambda: resolver.resolve(kind, raw))
    errors.raise_all()


def plan_recipe(recipe: Recipe, resolver: ComponentResolver) -> list[StagePlan]:
    context = PlanContext(recipe, resolver)
    for section in recipe.stages:
        entry = StageEntry(
            id=section.id,
            index=section.index,
            key=f"stages[{section.index}]",
            scheme=resolver.resolve("scheme", section.scheme),
            model=resolver.resolve("model", section.model) if section.model else None,
            loss=resolver.resolve("loss", section.loss) if section.loss else None,
            train=section.train,
        )
        context.plan_entry(entry)
    return list(context.stages)


# --- the one entry point: a recipe planned and checked short of training -----------


@attrs.define
class PreparedRun:
    """A recipe that passed every check short of training (:func:`prepare_run`)."""

    recipe: Recipe
    host: PluginHost
    stages: list[StagePlan]
    dataset: ComponentSpec
    loggers: list[ComponentSpec]
    resolver: ComponentResolver
    notes: list[str] = attrs.field(factory=list)  # warnings already logged (shadowed --set values)
    pipeline: str = "auto"  # [train] pipeline, the same for every stage (engine/data/pipeline.py)

    def check_data(self, data: DataSplits) -> None:
        """Refuse teacher / init_from checkpoints that do not fit the loaded data
        (call before training; :func:`prepare_run` checked already when the dataset
        could tell its shape without loading)."""
        shape = DataShape(tuple(data.input_shape), int(data.num_classes))
        check_sources_fit(self.stages, shape, self.resolver, self.dataset.name)


def prepare_run(recipe: Recipe, host: PluginHost, *, max_epochs: int | None = None) -> PreparedRun:
    """Plan a loaded recipe with ``host``'s plugins and check what can be checked before
    the data is loaded: components and their parameters, every stage's references,
    the ``[reference]`` ids, checkpoints against the dataset's shape (when it can tell
    it without loading), one ``pipeline`` for all stages; ``--set`` values a stage
    shadows are logged as notes. ``max_epochs`` caps every stage's epochs
    (scheme-planned stages included)."""
    resolver = ComponentResolver(recipe, host.registries)
    check_components(recipe, resolver)
    dataset = resolver.resolve("dataset", recipe.dataset)
    loggers = [resolver.resolve("logger", raw) for raw in recipe.loggers]
    stages = _capped(plan_recipe(recipe, resolver), max_epochs)
    _check_references(recipe, stages)
    shape = dataset.instantiate().data_shape(dataset_context(recipe))
    if shape is not None:  # otherwise PreparedRun.check_data, once the data is loaded
        check_sources_fit(stages, shape, resolver, dataset.name)
    pipeline = run_pipeline(stages, dataset, recipe.file)
    notes = shadowed_overrides(recipe, stages, max_epochs)
    for note in notes:
        log.warning(note)
    return PreparedRun(recipe, host, stages, dataset, loggers, resolver, notes, pipeline)


def dataset_context(recipe: Recipe) -> DatasetContext:
    """What a dataset plugin is told: the seed, the recipe's folder, the cache folder."""
    cache = os.environ.get("PYRAMIDKD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pyramidkd"))
    return DatasetContext(seed=recipe.experiment.seed, recipe_dir=recipe.directory, cache_dir=cache)


def _capped(stages: list[StagePlan], max_epochs: int | None) -> list[StagePlan]:
    if max_epochs is None:
        return stages
    if max_epochs < 1:
        raise RecipeError(f"--max-epochs must be 1 or more, got {max_epochs}", fix="pass a positive number, e.g. --max-epochs 1")
    return [attrs.evolve(s, train=attrs.evolve(s.train, epochs=min(s.train.epochs, max_epochs))) for s in stages]


def _check_references(recipe: Recipe, stages: list[StagePlan]) -> None:
    """Every ``[reference]`` key names a stage or an entry."""
    for stage_id in recipe.reference:
        if not any(stage.id == stage_id or stage.entry_id == stage_id for stage in stages):
            raise RecipeError(
                f"reference for unknown stage {stage_id!r}",
                file=recipe.file,
                key=f"reference.{stage_id}",
                fix=f"use a stage id: {', '.join(s.id for s in stages)}",
            )


# --- checks after planning --------------------------------------------------------


def check_sources_fit(stages: list[StagePlan], shape: DataShape, resolver: ComponentResolver, dataset: str) -> None:
    """Refuse a teacher or ``init_from`` checkpoint trained on images of another
    shape or another class count than the dataset's (before anything trains)."""
    for stage in stages:
        roles = [("teacher", source) for source in stage.teachers] + [("init_from", stage.init_from)]
        for role, source in roles:
            if not isinstance(source, CheckpointFile):
                continue  # a stage of this run trains on this run's data
            model = resolver.checkpoint_model(source)
            if model.input_shape is None or model.num_classes is None:
                continue
            theirs = DataShape(tuple(model.input_shape), int(model.num_classes))
            if theirs == shape:
                continue
            raise CheckpointError(
                f"stage {stage.id!r}: the {role} checkpoint {source.path} was trained on {theirs.describe()}, "
                f"but the dataset {dataset!r} gives {shape.describe()}",
                file=resolver.recipe.file,
                key=source.key or None,
                fix=f"use a checkpoint trained on {shape.describe()}, or set [dataset] to give {theirs.describe()} "
                "(its image_size, channels or classes)",
            )
    check_stage_taps(stages, shape, resolver)  # models built on the meta device: image size, taps, feature shapes


# --- helpers ------------------------------------------------------------------------


def _drop_paths(table: dict, drop: set[tuple], prefix: tuple = ()) -> dict:
    kept = {}
    for key, value in table.items():
        if isinstance(value, dict):
            inner = _drop_paths(value, drop, prefix + (key,))
            if inner:
                kept[key] = inner
        elif prefix + (key,) not in drop:
            kept[key] = value
    return kept
