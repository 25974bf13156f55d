"""The sweep file: ``[sweep]`` (name, recipe(s), seeds, baseline, set), ``[grid]``
(key path -> values; every combination is a cell) and ``[launcher]``, validated
like a recipe (every error names the file, the key and a fix), expanded into
cells x seeds.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from typing import Any

import attrs

from ..components import ComponentSpec
from ..errors import UserError, did_you_mean, suggest
from ..recipe import STAGE_ID, format_key_path, format_override, format_toml_value, parse_key_path, read_toml
from ..validation import ErrorList, FieldValueError, Structurer

SWEEP_KEYS = ("sweep", "grid", "launcher")
BASELINE_SPECIAL_KEYS = ("recipe", "stage")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]+")


def _name(instance, attribute, value):
    if not STAGE_ID.match(value):
        raise FieldValueError(f"{value!r} is not a usable name", "use letters, digits, '.', '_' and '-' (it names folders)")


def _seeds(instance, attribute, value):
    if not value:
        raise FieldValueError("needs at least one seed", "e.g. seeds = [0, 1, 2]")
    if len(set(value)) != len(value):
        raise FieldValueError(f"seeds repeat: {value}", "list each seed once")


def _recipes(instance, attribute, value):
    if isinstance(value, list) and not value:
        raise FieldValueError("the list of recipes is empty", 'name at least one, e.g. recipe = "../recipes/quickstart.toml"')


@attrs.define
class SweepSection:
    """``[sweep]``."""

    name: str = attrs.field(validator=_name, metadata={"help": "names the sweep and its default folder runs/NAME"})
    recipe: str | list[str] = attrs.field(validator=_recipes, metadata={"help": "a recipe path relative to this file, or a list (an axis)"})
    seeds: list[int] = attrs.field(factory=lambda: [0], validator=_seeds)
    baseline: dict[str, Any] | list[dict[str, Any]] | None = None
    set: dict[str, Any] = attrs.field(factory=dict, metadata={"help": "--set values for every cell"})


@attrs.frozen
class SweepCell:
    """One combination of recipe and grid values."""

    id: str
    recipe: str  # as written in the sweep file
    recipe_path: str  # absolute
    overrides: dict[str, Any]  # key path -> value ([sweep] set, then this cell's grid values)
    folder: str  # relative to the sweep folder ("" for `run --seeds`)

    def override_args(self) -> list[str]:
        return [format_override(key, value) for key, value in self.overrides.items()]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "recipe": self.recipe, "recipe_path": self.recipe_path, "overrides": self.overrides,
                "folder": self.folder}


@attrs.frozen
class Baseline:
    """What the other cells are compared with: a cell's same stage (``stage`` None),
    or a given stage (of ``cell``, or of each cell itself when ``cell`` is None)."""

    label: str
    cell: str | None
    stage: str | None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class SweepPlan:
    name: str
    file: str
    seeds: list[int]
    cells: list[SweepCell]
    baselines: list[Baseline]
    launcher: ComponentSpec | None = None

    def definition(self) -> dict[str, Any]:
        """What ``sweep.json`` holds; two plans with the same definition are the same sweep."""
        return {"format": 1, "name": self.name, "file": os.path.abspath(self.file), "seeds": list(self.seeds),
                "cells": [cell.to_dict() for cell in self.cells], "baselines": [b.to_dict() for b in self.baselines]}

    def cell(self, cell_id: str) -> SweepCell:
        return next(cell for cell in self.cells if cell.id == cell_id)


def comparable(definition: dict[str, Any]) -> str:
    """The parts of a sweep definition that make it the same sweep, a line per cell
    (so that a diff reads): not where its files lie, nor its seeds (adding seeds
    continues a sweep; other seeds' runs stay)."""
    lines = [f"name: {definition.get('name')}"]
    for cell in definition.get("cells", []):
        values = " ".join(f"--set {format_override(k, v)}" for k, v in (cell.get("overrides") or {}).items())
        folder = f" (folder {cell.get('folder')!r})" if cell.get("folder") != cell.get("id") else ""
        lines.append(f"cell {cell.get('id')}{folder}: {cell.get('recipe')} {values}".rstrip())
    for baseline in definition.get("baselines", []):
        lines.append(f"baseline {baseline.get('label')}: cell {baseline.get('cell')}, stage {baseline.get('stage')}")
    return "\n".join(lines) + "\n"


def load_sweep(path: str, *, launcher: str | None = None, registry=None) -> SweepPlan:
    """Read and validate a sweep file (every independent error at once). ``launcher``
    replaces ``[launcher] name``; ``registry`` (the host's launcher registry) validates
    the launcher's keys."""
    data = read_toml(path)
    structurer = Structurer(path)
    errors = ErrorList()
    for key in (key for key in data if key not in SWEEP_KEYS):
        errors.errors.append(structurer.error(key, f"unknown section {key!r}; a sweep file has [sweep], [grid] and [launcher]",
                                              f"{did_you_mean(key, SWEEP_KEYS, 'did you mean [{}]? ')}remove or rename it "
                                              "(recipe keys go in [sweep] set or [grid])"))
    section = None
    if "sweep" not in data:
        errors.errors.append(structurer.error("sweep", "the [sweep] table is missing", 'add [sweep] with name = "..." and recipe = "..."'))
    else:
        section = errors.check(lambda: structurer.structure(SweepSection, data["sweep"], "sweep"))
    fixed = errors.check(lambda: _key_paths(section.set, "sweep.set", structurer, values_are_lists=False), {}) if section else {}
    grid = errors.check(lambda: _key_paths(_table(data.get("grid", {}), "grid", structurer), "grid", structurer, values_are_lists=True))
    for key in (key for key in fixed if key in (grid or {})):
        errors.errors.append(structurer.error(f"grid.{key}", f"{key!r} is set both in [sweep] set and in [grid]", "keep it in one of them"))
    spec = errors.check(lambda: launcher_spec(data.get("launcher", {}), launcher, registry, structurer)) if registry is not None else None
    if section is not None and grid is not None and not errors.errors:
        cells = _cells(path, section, fixed, grid)
        baselines = errors.check(lambda: _baselines(section.baseline, cells, grid, structurer))
    errors.raise_all()
    return SweepPlan(section.name, path, list(section.seeds), cells, baselines, spec)


def _table(value: Any, key: str, structurer: Structurer) -> dict:
    if not isinstance(value, dict):
        raise structurer.error(key, f"expected a table, got {value!r}", f"write [{key}] as a table of keys")
    return value


def _key_paths(table: dict, where: str, structurer: Structurer, *, values_are_lists: bool) -> dict[str, Any]:
    """Normalised key paths (``stages[1].x`` and ``stages.1.x`` are one key) -> values."""
    result: dict[str, Any] = {}
    errors = ErrorList()
    for raw_key, value in table.items():
        key = format_key_path(parse_key_path(raw_key))
        errors.check(lambda: _check_key_path(raw_key, key, value, result, where, structurer, values_are_lists))
        result[key] = value
    errors.raise_all()
    return result


def _check_key_path(raw_key: str, key: str, value: Any, seen: dict, where: str, structurer: Structurer, values_are_lists: bool) -> None:
    if not key:
        raise structurer.error(f"{where}.{raw_key}", f"{raw_key!r} is not a key path", 'write a recipe key path, e.g. "train.epochs"')
    if key in seen:
        raise structurer.error(f"{where}.{raw_key}", f"the key path {key!r} appears twice", "keep one")
    if values_are_lists:
        if not isinstance(value, list) or not value:
            raise structurer.error(f'{where}."{raw_key}"', f"expected a non-empty list of values, got {value!r}",
                                   f'write "{raw_key}" = [value1, value2]')
        texts = [json.dumps(v, sort_keys=True, default=str) for v in value]
        if len(set(texts)) != len(texts):
            raise structurer.error(f'{where}."{raw_key}"', f"a value repeats in {value!r}", "list each value once")


def _cells(path: str, section: SweepSection, fixed: dict[str, Any], grid: dict[str, list]) -> list[SweepCell]:
    recipes = section.recipe if isinstance(section.recipe, list) else [section.recipe]
    base = os.path.dirname(os.path.abspath(path))
    varying = [key for key, values in grid.items() if len(values) > 1]
    short = _short_names(varying)
    cells, seen = [], {}
    for recipe in recipes:
        recipe_path = os.path.normpath(os.path.join(base, recipe))
        for combo in itertools.product(*grid.values()):
            values = dict(zip(grid, combo))
            parts = [os.path.splitext(os.path.basename(recipe))[0]] if len(recipes) > 1 or not varying else []
            parts += [f"{short[key]}={_value_text(values[key])}" for key in varying]
            cell_id = safe_id("-".join(parts))
            if cell_id in seen:
                seen[cell_id] += 1
                cell_id = f"{cell_id}-{seen[cell_id]}"
            else:
                seen[cell_id] = 1
            cells.append(SweepCell(cell_id, recipe, recipe_path, {**fixed, **values}, cell_id))
    return cells


def safe_id(text: str) -> str:
    """``text`` usable as a folder and file name."""
    return _UNSAFE.sub("_", text) or "cell"


def _short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key path that tells the varying axes apart."""
    parts = {key: parse_key_path(key) for key in keys}
    for depth in range(1, max((len(p) for p in parts.values()), default=1) + 1):
        names = {key: format_key_path(p[-depth:]).lstrip(".") for key, p in parts.items()}
        if len(set(names.values())) == len(names):
            return names
    return {key: key for key in keys}


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return str(value["name"]) if "name" in value and len(value) == 1 else json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, list):
        return ",".join(_value_text(v) for v in value)
    return str(value)


def _baselines(raw: dict | list | None, cells: list[SweepCell], grid: dict, structurer: Structurer) -> list[Baseline]:
    if raw is None:
        return []
    tables = raw if isinstance(raw, list) else [raw]
    baselines = []
    for index, table in enumerate(tables):
        key = "sweep.baseline" + (f"[{index}]" if isinstance(raw, list) else "")
        baselines.append(_baseline(table, cells, grid, structurer, key))
    labels = [b.label for b in baselines]
    if len(set(labels)) != len(labels):
        raise structurer.error("sweep.baseline", f"a baseline repeats: {labels}", "list each baseline once")
    return baselines


def _baseline(table: dict, cells: list[SweepCell], grid: dict, structurer: Structurer, key: str) -> Baseline:
    if not table:
        raise structurer.error(key, "an empty baseline", 'name grid values, e.g. { "train.epochs" = 10 }, and/or a stage = "id"')
    stage = table.get("stage")
    if stage is not None and not isinstance(stage, str):
        raise structurer.error(f"{key}.stage", f"expected a stage id, got {stage!r}", 'write stage = "id"')
    wanted = {format_key_path(parse_key_path(k)): v for k, v in table.items() if k not in BASELINE_SPECIAL_KEYS}
    errors = ErrorList()
    for path, value in wanted.items():
        errors.check(lambda: _check_baseline_value(path, value, grid, structurer, key, sorted({c.recipe_path for c in cells})))
    errors.raise_all()
    recipe = table.get("recipe")
    selects_cell = bool(wanted) or recipe is not None
    if not selects_cell:  # a stage of each cell: compare within the cell
        return Baseline(stage, None, stage)
    matches = [cell for cell in cells if all(cell.overrides.get(k) == v for k, v in wanted.items())
               and (recipe is None or recipe in (cell.recipe, os.path.splitext(os.path.basename(cell.recipe))[0]))]
    if len(matches) != 1:
        found = ", ".join(cell.id for cell in matches) or "none"
        raise structurer.error(key, f"the baseline must pick exactly one cell; it matches {len(matches)} ({found})",
                               "give a value for every [grid] key with more than one value (and recipe = ... for a recipe list)")
    cell = matches[0].id
    return Baseline(f"{cell}/{stage}" if stage else cell, cell, stage)


def _recipe_has(recipe_path: str, key: str) -> bool:
    """Whether the recipe file sets ``key`` (stages named by id or index)."""
    try:
        node: Any = read_toml(recipe_path)
    except UserError:
        return False
    for part in parse_key_path(key):
        if isinstance(node, list) and isinstance(part, str):
            node = next((item for item in node if isinstance(item, dict) and item.get("id") == part), None)
        elif isinstance(node, list) and isinstance(part, int):
            node = node[part] if part < len(node) else None
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            node = None
        if node is None:
            return False
    return True


def _check_baseline_value(path: str, value: Any, grid: dict, structurer: Structurer, key: str, recipes: list[str]) -> None:
    """A baseline's ``path = value`` must name a [grid] key and one of its values."""
    if path in grid:
        if value not in grid[path]:
            values = "[" + ", ".join(format_toml_value(v) for v in grid[path]) + "]"
            raise structurer.error(f"{key}.{path}", f"{format_toml_value(value)} is not one of the grid's values {values}",
                                   f"use one of {values}")
        return
    close = suggest(path, list(grid))
    if close is not None and any(_recipe_has(recipe, path) and not _recipe_has(recipe, close) for recipe in recipes):
        fix = f"did you mean the [grid] key {close}? it is misspelt: the recipe has {path}; correct it in [grid]"
    elif close is not None:
        fix = f"did you mean the [grid] key {close}? correct whichever of the two is misspelt"
    else:
        fix = f"use one of: {', '.join(grid) or '(no grid)'}, recipe or stage"
    raise structurer.error(f"{key}.{path}", f"{path!r} is not a [grid] key", fix)


def launcher_spec(table: Any, name: str | None, registry, structurer: Structurer) -> ComponentSpec:
    """The launcher: ``[launcher] name`` (or ``name`` from the command line) with
    its keys; a sub-table named after a launcher holds that launcher's keys
    (``[launcher.ray]``), so one file can carry settings for several."""
    table = dict(_table(table, "launcher", structurer))
    chosen = name or table.get("name", "local")
    if not isinstance(chosen, str):
        raise structurer.error("launcher.name", f"expected a launcher name, got {chosen!r}", 'write name = "local"')
    key = "launcher.name" if name is None and "name" in table else "launcher"
    cls = registry.get(chosen, file=structurer.file if name is None else "--launcher", key=key if name is None else None)
    own = table.pop(chosen, None)
    nested = {k for k, v in table.items() if isinstance(v, dict) and k in registry}
    flat = {k: v for k, v in table.items() if k != "name" and k not in nested}
    if name is not None and name != table.get("name", "local"):
        flat = {}  # the flat keys belong to the launcher the file names
    params = {**flat, **(own or {})}
    where = f"launcher.{chosen}" if own else "launcher"
    return ComponentSpec(cls, structurer.structure(cls.Params, params, where), where)
