"""The search file: ``[search]`` (name, recipe, seeds, metric, stage, direction,
trials, sampler, pruner, set, ...), ``[space]`` (key path -> distribution) and
``[launcher]``, validated like a recipe and a sweep file (every error names the
file, the key and a fix). :func:`check_search` then tries every space key in
the recipe, through the same ``--set`` path a trial uses.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Literal

import attrs

from ..components import ComponentSpec
from ..errors import RecipeError, UserError
from ..recipe import format_key_path, format_override, parse_key_path, read_toml
from ..runner import PreparedRun, dataset_context, prepare
from ..sweeps.spec import _name, _seeds, launcher_spec
from ..validation import FieldValueError, Structurer, positive

SEARCH_KEYS = ("search", "space", "launcher")
METRICS = ("best_val_acc", "last_val_acc")  # a stage's validation figures in summary.json
TEST_METRICS = ("test_acc", "test_loss")
DEFAULT_FINAL_SEEDS = [100, 101, 102]
RANGE_KEYS = ("low", "high", "log", "step")


def _metric(instance, attribute, value):
    if value in TEST_METRICS:
        raise FieldValueError(
            f"a search never selects on test data ({value!r}): the figure it reports would be test-selected",
            'use metric = "best_val_acc" (validation); the best values are re-run on final_seeds and their test accuracy reported')
    if value not in METRICS:
        close = difflib.get_close_matches(value, METRICS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise FieldValueError(f"unknown metric {value!r}; a search selects on one of: {', '.join(METRICS)}",
                              f"{hint}use one of the listed metrics")


def _final_seeds(instance, attribute, value):
    if len(set(value)) != len(value):
        raise FieldValueError(f"seeds repeat: {value}", "list each seed once")


@attrs.define
class SearchSection:
    """``[search]``."""

    name: str = attrs.field(validator=_name, metadata={"help": "names the search, its study and its default folder runs/NAME"})
    recipe: str = attrs.field(metadata={"help": "the recipe path, relative to this file"})
    seeds: list[int] = attrs.field(factory=lambda: [0], validator=_seeds,
                                   metadata={"help": "each trial's score is the mean over these seeds"})
    metric: str = attrs.field(default="best_val_acc", validator=_metric, metadata={"help": "best_val_acc or last_val_acc"})
    stage: str | None = attrs.field(default=None, metadata={"help": "the stage whose metric is tuned (default: the last)"})
    direction: Literal["maximize", "minimize"] = "maximize"
    trials: int = attrs.field(default=20, validator=positive, metadata={"help": "trials in the study (running again adds up to it)"})
    parallel: int | None = attrs.field(default=None, validator=positive, metadata={
        "help": "trials at a time (default: the local launcher's workers / seeds, else 1)"})
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "none"] = "median"
    startup_trials: int = attrs.field(default=5, validator=positive, metadata={
        "help": "the median pruner prunes nothing before this many trials finished"})
    warmup_epochs: int = attrs.field(default=0, metadata={"help": "epochs of the tuned stage before the pruner acts"})
    seed: int = attrs.field(default=0, metadata={"help": "the sampler's seed"})
    final_seeds: list[int] = attrs.field(factory=lambda: list(DEFAULT_FINAL_SEEDS), validator=_final_seeds, metadata={
        "help": "fresh seeds the best values are re-run on, for their test accuracy ([] skips it)"})
    storage: str | None = attrs.field(default=None, metadata={
        "help": 'the Optuna storage URL (default: sqlite:///DIR/study.db), e.g. "postgresql://host/db"'})
    set: dict[str, Any] = attrs.field(factory=dict, metadata={"help": "--set values for every trial"})


@attrs.frozen
class Parameter:
    """One ``[space]`` entry: a float or int range (``log``, ``step``) or ``choices``."""

    key: str  # normalised key path: the trial's parameter name
    kind: str  # "float" | "int" | "choice"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def samples(self) -> list[Any]:
        """The values that validation tries in the recipe: both ends, or every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def grid_values(self) -> list[Any]:
        if self.kind == "choice":
            return list(self.choices)
        step = self.step if self.step is not None else 1  # a float range without step is refused for the grid
        count = round((self.high - self.low) / step) + 1
        return [self.low + i * step if self.kind == "int" else round(self.low + i * step, 10) for i in range(count)]

    def tidy(self, value: Any) -> Any:
        """A value Optuna drew, without binary noise on a step grid (0.30000000000000004 -> 0.3)."""
        if self.kind == "float" and self.step is not None and isinstance(value, float):
            return round(value, 10)
        return value

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        text = f"{self.kind} in [{self.low}, {self.high}]"
        return text + (", log scale" if self.log else "") + (f", step {self.step}" if self.step is not None else "")

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["choices"] = list(self.choices)
        return data


@attrs.define
class SearchPlan:
    name: str
    file: str
    recipe: str  # as written
    recipe_path: str  # absolute
    section: SearchSection
    fixed: dict[str, Any]  # [search] set, normalised key paths
    space: list[Parameter]
    launcher: ComponentSpec | None = None
    stage: str = ""  # the tuned stage (filled by check_search when [search] stage is left out)

    @property
    def seeds(self) -> list[int]:
        return list(self.section.seeds)

    def fixed_args(self) -> list[str]:
        return [format_override(key, value) for key, value in self.fixed.items()]

    def definition(self) -> dict[str, Any]:
        """What ``search.json`` holds; a folder holds one search (its study would mix otherwise)."""
        s = self.section
        return {"format": 1, "name": self.name, "recipe": self.recipe_path, "set": self.fixed, "seeds": list(s.seeds),
                "metric": s.metric, "stage": self.stage, "direction": s.direction,
                "space": [p.to_dict() for p in self.space]}


def load_search(path: str, *, launcher: str | None = None, registry=None) -> SearchPlan:
    """Read and validate a search file (not yet its recipe: :func:`check_search`)."""
    data = read_toml(path)
    structurer = Structurer(path)
    unknown = [key for key in data if key not in SEARCH_KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], SEARCH_KEYS, n=1)
        hint = f"did you mean [{close[0]}]? " if close else ""
        raise structurer.error(unknown[0], f"unknown section {unknown[0]!r}; a search file has [search], [space] and [launcher]",
                               f"{hint}remove or rename it (fixed recipe values go in [search] set)")
    if "search" not in data:
        raise structurer.error("search", "the [search] table is missing", 'add [search] with name = "..." and recipe = "..."')
    section = structurer.structure(SearchSection, data["search"], "search")
    overlap = [seed for seed in section.final_seeds if seed in section.seeds]
    if overlap:
        raise structurer.error("search.final_seeds", f"seeds {overlap} are also search seeds: the final figure would not be fresh",
                               "use seeds the search does not use, e.g. final_seeds = [100, 101, 102]")
    if section.pruner == "median" and section.direction == "minimize":
        raise structurer.error("search.pruner", "the pruner compares each epoch's validation accuracy (higher is better), "
                               "but direction is minimize", 'use pruner = "none", or direction = "maximize"')
    fixed = _fixed(section.set, structurer)
    space = parse_space(data.get("space"), structurer)
    for parameter in space:
        if parameter.key in fixed:
            raise structurer.error(f'space."{parameter.key}"', f"{parameter.key!r} is set both in [search] set and in [space]",
                                   "keep it in one of them")
    if section.sampler == "grid":
        _check_grid(space, structurer)
    recipe_path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), section.recipe))
    plan = SearchPlan(section.name, path, section.recipe, recipe_path, section, fixed, space, stage=section.stage or "")
    if registry is not None:
        plan.launcher = launcher_spec(data.get("launcher", {}), launcher, registry, structurer)
    return plan


def _fixed(table: dict, structurer: Structurer) -> dict[str, Any]:
    result = {}
    for raw_key, value in table.items():
        key = format_key_path(parse_key_path(raw_key))
        if not key:
            raise structurer.error(f"search.set.{raw_key}", f"{raw_key!r} is not a key path", 'write a recipe key path, e.g. "train.epochs"')
        result[key] = value
    return result


def parse_space(table: Any, structurer: Structurer) -> list[Parameter]:
    """``[space]``: key path -> ``{ low, high, log, step }`` or ``{ choices }``."""
    if table is None or table == {}:
        raise structurer.error("space", "the [space] table is missing or empty: there is nothing to search",
                               'add [space] with e.g. "stages.student.loss.temperature" = { low = 1.0, high = 8.0, log = true }')
    if not isinstance(table, dict):
        raise structurer.error("space", f"expected a table, got {table!r}", "write [space] as a table of key paths")
    parameters, seen = [], set()
    for raw_key, value in table.items():
        key = format_key_path(parse_key_path(raw_key))
        where = f'space."{raw_key}"'
        if not key:
            raise structurer.error(where, f"{raw_key!r} is not a key path", 'write a recipe key path, e.g. "train.epochs"')
        if key in seen:
            raise structurer.error(where, f"the key path {key!r} appears twice", "keep one")
        seen.add(key)
        parameters.append(_parameter(key, value, where, structurer))
    return parameters


def _parameter(key: str, value: Any, where: str, structurer: Structurer) -> Parameter:
    example = f'"{key}" = {{ low = 1.0, high = 8.0 }} or {{ choices = [2.0, 4.0] }}'
    if isinstance(value, list):
        raise structurer.error(where, "a list is a grid axis in sweep files; a search space needs a distribution",
                               f'write "{key}" = {{ choices = {format_override("x", value)[2:]} }}')
    if not isinstance(value, dict):
        raise structurer.error(where, f"expected a distribution table, got {value!r} (a fixed value goes in [search] set)",
                               f"write {example}")
    unknown = [k for k in value if k not in (*RANGE_KEYS, "choices")]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*RANGE_KEYS, "choices"], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise structurer.error(f"{where}.{unknown[0]}", f"unknown key {unknown[0]!r}; valid keys: low, high, log, step, choices",
                               f"{hint}remove or rename it")
    if "choices" in value:
        return _choices(key, value, where, structurer)
    for bound in ("low", "high"):
        if bound not in value:
            raise structurer.error(f"{where}.{bound}", f"required key is missing ({bound} of the range)", f"write {example}")
        if isinstance(value[bound], bool) or not isinstance(value[bound], (int, float)):
            raise structurer.error(f"{where}.{bound}", f"expected a number, got {value[bound]!r}", f"write {example}")
    return _range(key, value, where, structurer)


def _choices(key: str, value: dict, where: str, structurer: Structurer) -> Parameter:
    choices = value["choices"]
    extra = [k for k in value if k != "choices"]
    if extra:
        raise structurer.error(f"{where}.{extra[0]}", f"{extra[0]!r} does not go with choices", "give choices alone, or a range without choices")
    if not isinstance(choices, list) or not choices:
        raise structurer.error(f"{where}.choices", f"expected a non-empty list, got {choices!r}", "e.g. choices = [2.0, 4.0]")
    if any(not isinstance(c, (str, int, float, bool)) for c in choices):
        raise structurer.error(f"{where}.choices", "choices must be numbers, strings or true/false (Optuna stores them)",
                               "tune a table's single keys instead, e.g. optimizer.lr")
    if len({repr(c) for c in choices}) != len(choices):
        raise structurer.error(f"{where}.choices", f"a value repeats in {choices!r}", "list each value once")
    return Parameter(key, "choice", choices=tuple(choices))


def _range(key: str, value: dict, where: str, structurer: Structurer) -> Parameter:
    low, high, step, log = value["low"], value["high"], value.get("step"), value.get("log", False)
    if not isinstance(log, bool):
        raise structurer.error(f"{where}.log", f"expected true or false, got {log!r}", "write log = true")
    if not low < high:
        raise structurer.error(where, f"low must be below high, got low = {low}, high = {high}", "swap them, or give a wider range")
    kind = "int" if isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int)) else "float"
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise structurer.error(f"{where}.step", f"expected a positive number, got {step!r}", "e.g. step = 0.1")
        if log:
            raise structurer.error(f"{where}.log", "log = true does not go with step", "drop one of them")
        count = (high - low) / step
        if not math.isclose(count, round(count), abs_tol=1e-9):
            raise structurer.error(f"{where}.step", f"step {step} does not divide high - low = {high - low:g}",
                                   f"choose a step that reaches high from low, or set high = {low + math.floor(count) * step:g}")
    if log and low <= 0:
        raise structurer.error(f"{where}.low", f"a log scale needs low > 0, got {low}", "set low above 0, or drop log = true")
    if kind == "float":
        low, high = float(low), float(high)
        step = float(step) if step is not None else None
    return Parameter(key, kind, low, high, log, step)


def _check_grid(space: list[Parameter], structurer: Structurer) -> None:
    for parameter in space:
        if parameter.kind == "float" and parameter.step is None:
            raise structurer.error(f'space."{parameter.key}"', 'sampler = "grid" needs a finite set of values; this float range has none',
                                   "add step = ..., or give choices = [...]")


def check_search(plan: SearchPlan) -> PreparedRun:
    """Try the recipe with the fixed values, then each space value at both ends (or
    each choice) alone, then together, before anything runs; fill in and check the
    tuned stage."""
    base = [*plan.fixed_args(), f"experiment.seed={plan.seeds[0]}"]
    _try(plan, base, "search.set", "[search] set")
    for parameter in plan.space:
        for value in parameter.samples():
            _try(plan, [*base, format_override(parameter.key, value)], f'space."{parameter.key}"', f"{parameter.key} = {value!r}")
    first = [format_override(p.key, p.samples()[0]) for p in plan.space]
    prepared = _try(plan, base + first, "space", "the space's first values together (" + ", ".join(first) + ")")
    prepared.dataset.instantiate().check(dataset_context(prepared.recipe))  # its files are there
    stages = [stage.id for stage in prepared.stages]
    if not plan.stage:
        plan.stage = stages[-1]
    elif plan.stage not in stages:
        close = difflib.get_close_matches(plan.stage, stages, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(f"stage {plan.stage!r} is not a stage of {plan.recipe}; stages: {', '.join(stages)}",
                          file=plan.file, key="search.stage", fix=f"{hint}name one of the stages listed")
    return prepared


def _try(plan: SearchPlan, overrides: list[str], key: str, what: str) -> PreparedRun:
    try:
        return prepare(plan.recipe_path, overrides)
    except UserError as error:
        where = f" ({error.key})" if error.key else ""
        raise RecipeError(f"{what} does not fit the recipe {plan.recipe}{where}: {error.message}", file=plan.file, key=key,
                          fix=error.fix or "check the key path and the value") from None
