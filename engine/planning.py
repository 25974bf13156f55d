"""From a validated recipe to the ordered list of stages to run.

Each ``[[stages]]`` entry's scheme plans one or more stages. The context hands
schemes validated components and resolves references: ``"teacher"`` names an
earlier stage (or an earlier entry, meaning its last stage); a path ending in
``.pt`` names a checkpoint file.
"""

from __future__ import annotations

import difflib
import os

import attrs

from .components import CheckpointFile, ComponentSpec, ModelSource, StageOutput, StagePlan
from .errors import RecipeError
from .recipe import Recipe, StageSection, TrainSection, resolve_component, stage_train_section


@attrs.define
class StageEntry:
    """One ``[[stages]]`` entry as a scheme sees it (components validated)."""

    id: str
    index: int
    key: str  # "stages[2]"
    scheme: ComponentSpec
    model: ComponentSpec | None
    loss: ComponentSpec | None
    section: StageSection

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

    def __init__(self, recipe: Recipe, registries: dict):
        self.recipe = recipe
        self.registries = registries
        self.stages: list[StagePlan] = []
        self._entry_outputs: dict[str, str] = {}  # entry id -> its last stage id

    # components
    def component(self, kind: str, name: str, params: dict | None = None, key: str = "") -> ComponentSpec:
        """Build a component a scheme chooses itself (e.g. the default ``ce`` loss)."""
        from .recipe import RawComponent

        return resolve_component(self.recipe, self.registries, kind, RawComponent(name, dict(params or {}), key))

    def train(self, entry: StageEntry, defaults: dict | None = None) -> TrainSection:
        """The entry's training settings: scheme defaults < ``[train]`` < ``[stages.train]``."""
        return stage_train_section(self.recipe, entry.section, defaults)

    # references
    def model_source(self, reference: str, key: str) -> ModelSource:
        """Resolve a reference to an earlier stage, an earlier entry, or a ``.pt`` file."""
        if reference in self._entry_outputs:
            return StageOutput(self._entry_outputs[reference])
        if any(stage.id == reference for stage in self.stages):
            return StageOutput(reference)
        if reference.endswith((".pt", ".pth", ".ckpt")):
            path = reference if os.path.isabs(reference) else os.path.join(self.recipe.directory, reference)
            if not os.path.exists(path):
                raise RecipeError(
                    f"checkpoint file {reference!r} does not exist (looked at {path})",
                    file=self.recipe.file,
                    key=key,
                    fix="check the path (relative paths are relative to the recipe's folder)",
                )
            return CheckpointFile(os.path.abspath(path), key)
        known = list(self._entry_outputs) + [s.id for s in self.stages if s.id not in self._entry_outputs]
        later = [s.id for s in self.recipe.stages if s.id == reference]
        if later:
            message = f"stage {reference!r} runs later in the recipe; a stage can only use stages before it"
            fix = "move the referenced stage earlier"
        else:
            close = difflib.get_close_matches(reference, known, n=1)
            message = f"refers to stage {reference!r}, which does not exist; earlier stages: {', '.join(known) or '(none)'}"
            fix = (f"did you mean {close[0]!r}? " if close else "") + "name an earlier stage id or a checkpoint file (.pt)"
        raise RecipeError(message, file=self.recipe.file, key=key, fix=fix)

    def add(self, plan: StagePlan) -> None:
        if any(stage.id == plan.id for stage in self.stages):
            raise RecipeError(f"two stages are both named {plan.id!r}", file=self.recipe.file, key=plan.entry_id, fix="rename a stage")
        self.stages.append(plan)


def plan_recipe(recipe: Recipe, registries: dict) -> list[StagePlan]:
    context = PlanContext(recipe, registries)
    for section in recipe.stages:
        key = f"stages[{section.index}]"
        entry = StageEntry(
            id=section.id,
            index=section.index,
            key=key,
            scheme=resolve_component(recipe, registries, "scheme", section.scheme),
            model=resolve_component(recipe, registries, "model", section.model) if section.model else None,
            loss=resolve_component(recipe, registries, "loss", section.loss) if section.loss else None,
            section=section,
        )
        try:
            planned = list(entry.scheme.instantiate().plan(entry, context))
        except RecipeError as error:
            error.file = error.file or recipe.file
            raise
        if not planned:
            raise RecipeError(f"scheme {entry.scheme.name!r} planned no stages", file=recipe.file, key=key, fix="check the scheme's parameters")
        for plan in planned:
            plan.entry_id = plan.entry_id or entry.id
            if plan.loss.cls.needs_teacher and not plan.teachers:
                raise RecipeError(
                    f"loss {plan.loss.name!r} needs a teacher, but scheme {entry.scheme.name!r} gives stage {plan.id!r} none",
                    file=recipe.file,
                    key=plan.loss.key or f"{key}.loss",
                    fix='use scheme "kd" with teacher = "<stage id>", or a loss without a teacher (e.g. "ce")',
                )
            context.add(plan)
        context._entry_outputs[entry.id] = planned[-1].id
    return context.stages
