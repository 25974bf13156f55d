"""From a validated recipe to the ordered list of stages to run.

The flow runs one way: :func:`~pyramidkd.engine.recipe.load_recipe` validates the
host's keys, a :class:`ComponentResolver` looks every component up in the plugin
registries and validates its parameters, and each ``[[stages]]`` entry's scheme
plans one or more stages through a :class:`PlanContext`. The context resolves
references: ``"teacher"`` names an earlier stage (or an earlier entry, meaning its
last stage); a path ending in ``.pt`` names a checkpoint file.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import attrs

from .components import CheckpointFile, ComponentSpec, DataShape, ModelSource, StageOutput, StagePlan
from .errors import CheckpointError, RecipeError
from .recipe import RawComponent, Recipe, parse_key_path
from .settings import TrainSection

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


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
        shorthand = not params and isinstance(_lookup(self.recipe.data, key), str)
        return self.resolve(kind, RawComponent(name, dict(params or {}), key, shorthand=shorthand))

    def checkpoint_model(self, source: CheckpointFile) -> SourceModel:
        """The model a checkpoint file describes (read once per file)."""
        if source.path not in self._checkpoints:
            from .training.checkpoints import load_checkpoint

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
            written = _leaf_paths(self.recipe.data.get("train", {})) | _leaf_paths(section.train_overrides)
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
            close = difflib.get_close_matches(reference, known, n=1)
            message = f"refers to stage {reference!r}, which does not exist; earlier stages: {', '.join(known) or '(none)'}"
            fix = (f"did you mean {close[0]!r}? " if close else "") + "name an earlier stage id or a checkpoint file (.pt)"
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


def shadowed_overrides(recipe: Recipe, stages: list[StagePlan], max_epochs: int | None = None) -> list[str]:
    """One line per ``--set`` training value that some stages do not train with,
    because a stage-level setting (``[stages.train]``, a scheme's own such as
    ``stage1_epochs``) overrides it. ``max_epochs``: the cap already applied to
    ``stages``, so a ``--set`` epoch count counts as reaching a stage capped below it."""
    notes = []
    sections = {section.id: section for section in recipe.stages}
    for path in sorted(recipe.overridden):
        for leaf, value in _leaves(path, _lookup(recipe.data, path)):
            parts = parse_key_path(leaf)
            if parts[:1] == ["train"]:
                setting, entries = parts[1:], None
            elif len(parts) > 3 and parts[0] == "stages" and isinstance(parts[1], int) and parts[2] == "train":
                setting, entries = parts[3:], {recipe.stages[parts[1]].id} if parts[1] < len(recipe.stages) else set()
            else:
                continue
            by_source: dict[str, list[str]] = {}
            for stage in stages:
                if entries is not None and stage.entry_id not in entries:
                    continue
                actual = _attribute(stage.train, setting)
                wanted = min(value, max_epochs) if setting == ["epochs"] and max_epochs and isinstance(value, int) else value
                if actual is _MISSING or actual == wanted:
                    continue
                section = sections.get(stage.entry_id)
                if section is None:
                    continue
                own = f"stages[{section.index}].train.{'.'.join(map(str, setting))}"
                if entries is None and tuple(setting) in _leaf_paths(section.train_overrides):
                    if own in recipe.overridden:
                        continue  # both set from the command line: the stage's is meant
                    source = f"{_show(actual)}, from {own}"
                else:
                    source = f"{_show(actual)}, from scheme {section.scheme.name!r} of stages[{section.index}]"
                by_source.setdefault(source, []).append(stage.id)
            if by_source:
                where = "; ".join(f"{', '.join(ids)} ({source})" for source, ids in by_source.items())
                count = sum(len(ids) for ids in by_source.values())
                hint = "; --max-epochs N caps every stage" if setting == ["epochs"] else ""
                notes.append(f"--set {leaf}={_show(value)} does not reach {count} stage(s) that set their own: {where}{hint}")
    return notes


# --- helpers ------------------------------------------------------------------------

_MISSING = object()


def _lookup(data: Any, key: str) -> Any:
    node = data
    for part in parse_key_path(key):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _leaves(path: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves(f"{path}.{key}", item)]
    return [(path, value)]


def _leaf_paths(table: dict, prefix: tuple = ()) -> set[tuple]:
    paths = set()
    for key, value in table.items():
        paths |= _leaf_paths(value, prefix + (key,)) if isinstance(value, dict) else {prefix + (key,)}
    return paths


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


def _attribute(settings: Any, parts: list) -> Any:
    node = settings
    for part in parts:
        if not (attrs.has(type(node)) and isinstance(part, str) and hasattr(node, part)):
            return _MISSING
        node = getattr(node, part)
    return node


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else str(value)
