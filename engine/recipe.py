"""Recipes: one TOML file describing a whole experiment.

:func:`load_recipe` reads the file, applies ``--set`` overrides and validates the
host's own keys (``[experiment]``, ``[train]`` and each stage's ``[stages.train]``
over it, the shape of ``[[stages]]``), giving a :class:`Recipe`. Component
sections (``name = ...`` plus that plugin's keys) stay raw here: the planner
(:mod:`~pyramidkd.engine.planning`) looks them up in the plugin registries and
validates them with each component's ``Params`` class.
"""

from __future__ import annotations

import os
import re
import tomllib
from typing import Any

import attrs

from .errors import RecipeError, did_you_mean
from .settings import ExperimentSection, OptimizerSection, SchedulerSection, TrainSection  # noqa: F401  (re-exported)
from .validation import ErrorList, Structurer


@attrs.define
class RawComponent:
    """``name = "..."`` plus that component's own (not yet validated) keys."""

    name: str
    params: dict[str, Any]
    key: str
    shorthand: bool = False  # written as `scheme = "kd"`: errors point at the key itself


@attrs.define
class StageSection:
    id: str
    index: int
    scheme: RawComponent
    model: RawComponent | None
    loss: RawComponent | None
    train: TrainSection  # [train] with this stage's [stages.train] over it, validated
    train_overrides: dict[str, Any] = attrs.field(factory=dict)  # [stages.train] as written


@attrs.define
class Recipe:
    """A recipe with the host's keys validated; components still raw."""

    file: str
    data: dict[str, Any]  # the resolved TOML data (overrides applied)
    experiment: ExperimentSection
    train: TrainSection  # [train], validated
    dataset: RawComponent | None  # None only with problems deferred
    stages: list[StageSection]
    loggers: list[RawComponent]
    reference: dict[str, float]
    overridden: set[str]
    # Errors left for the planner to raise with the components' own (load_recipe(defer_errors=True)).
    problems: list[RecipeError] = attrs.field(factory=list)

    @property
    def directory(self) -> str:
        return os.path.dirname(os.path.abspath(self.file))

    def structurer(self) -> Structurer:
        return Structurer(self.file, self.overridden)


TOP_LEVEL_KEYS = ("experiment", "dataset", "train", "stages", "loggers", "reference")
STAGE_KEYS = ("id", "scheme", "model", "loss", "train")
DEFAULT_LOGGERS = ["console", "files"]
STAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def read_toml(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise RecipeError("recipe file not found", file=path, fix="check the path (recipes live in recipes/, e.g. recipes/quickstart.toml)")
    if os.path.isdir(path):
        raise RecipeError("is a directory, not a recipe file", file=path, fix="pass a .toml file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise RecipeError(f"cannot read the recipe: {error.strerror}", file=path, fix="check the file's permissions") from error
    if not raw.strip():
        raise RecipeError("the recipe is empty", file=path, fix="start from recipes/quickstart.toml")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise RecipeError(f"not UTF-8 text ({error.reason} at byte {error.start})", file=path, fix="save the recipe as UTF-8") from error
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"invalid TOML: {error}", file=path, fix="fix the syntax at that line and column") from error


# --- overrides ----------------------------------------------------------------

_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_key_path(path: str) -> list[str | int]:
    """``stages[1].loss.temperature`` or ``stages.1.loss.temperature`` -> parts."""
    parts: list[str | int] = []
    for match in _PATH_PART.finditer(path):
        name, index = match.groups()
        if index is not None:
            parts.append(int(index))
        elif name.isdigit():
            parts.append(int(name))
        else:
            parts.append(name)
    return parts


def lookup_key_path(data: Any, key: str) -> Any:
    """The value at ``key`` (``stages[1].loss``) in recipe data; ``None`` where there is none."""
    node = data
    for part in parse_key_path(key):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def leaf_paths(table: dict, prefix: tuple = ()) -> set[tuple]:
    """Every key path to a non-table value of ``table``, as tuples of keys."""
    paths = set()
    for key, value in table.items():
        paths |= leaf_paths(value, prefix + (key,)) if isinstance(value, dict) else {prefix + (key,)}
    return paths


def format_key_path(parts: list[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def parse_override(text: str) -> tuple[list[str | int], Any]:
    if "=" not in text:
        raise RecipeError(f"--set {text!r} is not KEY=VALUE", key=text, fix="write e.g. --set train.epochs=3")
    key, _, value_text = text.partition("=")
    key = key.strip()
    parts = parse_key_path(key)
    if not parts:
        raise RecipeError(f"--set {text!r} has no key", fix="write e.g. --set train.epochs=3")
    try:
        value = tomllib.loads(f"value = {value_text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()  # a bare word is taken as a string: --set dataset.name=digits
    return parts, value


def format_override(key: str, value: Any) -> str:
    """The ``--set`` text that sets ``key`` to ``value`` (any TOML value, tables included)."""
    return f"{key}={_toml_value(value)}"


def apply_overrides(data: dict[str, Any], overrides: list[str], file: str) -> set[str]:
    """Apply ``--set`` overrides in place; return the key paths they set."""
    touched = set()
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            where = format_key_path(parts[: depth + 1])
            if isinstance(node, list):
                part = _list_index(node, part, where, file, text)
                node = node[part]
                parts[depth] = part
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"--set {text}: {format_key_path(parts[:depth])} is not a table", file=file, key=where, fix="check the key path")
            if part not in node:
                node[part] = [] if part == "stages" else {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            last = _list_index(node, last, format_key_path(parts), file, text)
            parts[-1] = last
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {text}: {format_key_path(parts[:-1])} is not a table", file=file, key=format_key_path(parts), fix="check the key path")
        node[last] = value
        touched.add(format_key_path(parts))
    return touched


def _list_index(node: list, part: str | int, where: str, file: str, text: str) -> int:
    if isinstance(part, int):
        if part >= len(node):
            raise RecipeError(f"--set {text}: there is no {where} (the list has {len(node)} entries, counting from 0)", file=file, key=where, fix="use an existing index or a stage id")
        return part
    for index, item in enumerate(node):  # stages may be addressed by id: stages.teacher.epochs
        if isinstance(item, dict) and item.get("id") == part:
            return index
    ids = [str(item.get("id")) for item in node if isinstance(item, dict)]
    hint = did_you_mean(part, ids)
    raise RecipeError(f"--set {text}: no entry with id {part!r}; ids: {', '.join(ids)}", file=file, key=where, fix=f"{hint}use one of the ids or an index")


# --- step one: host keys --------------------------------------------------------


def load_recipe(path: str, overrides: list[str] | tuple[str, ...] = (), *, defer_errors: bool = False) -> Recipe:
    """Read, override and validate a recipe. Every independent error of the file is
    raised at once; with ``defer_errors`` they are left in :attr:`Recipe.problems`
    (when the recipe is still usable), for the planner to raise with the components' own."""
    data = read_toml(path)
    overridden = apply_overrides(data, list(overrides), path)
    return parse_recipe(data, path, overridden, defer_errors=defer_errors)


def parse_recipe(data: dict[str, Any], file: str, overridden: set[str] | None = None, *, defer_errors: bool = False) -> Recipe:
    structurer = Structurer(file, overridden or set())
    errors = ErrorList()
    for key in (key for key in data if key not in TOP_LEVEL_KEYS):
        hint = did_you_mean(key, TOP_LEVEL_KEYS, "did you mean [{}]? ")
        errors.errors.append(structurer.error(key, f"unknown section {key!r}; valid sections: {', '.join(TOP_LEVEL_KEYS)}", f"{hint}remove or rename it"))
    experiment = errors.check(lambda: structurer.structure(ExperimentSection, data.get("experiment", {}), "experiment"))
    train = errors.check(lambda: structurer.structure(TrainSection, data.get("train", {}), "train"))
    dataset = None
    if "dataset" not in data:
        errors.errors.append(structurer.error("dataset", "required section is missing", 'add [dataset] with name = "digits" (or another dataset plugin)'))
    else:
        dataset = errors.check(lambda: _raw_component(structurer, data["dataset"], "dataset"))
    stages = _parse_stages(structurer, data.get("stages"), train or TrainSection(), errors)
    loggers = errors.check(lambda: _parse_loggers(structurer, data.get("loggers", DEFAULT_LOGGERS)), [])
    reference = errors.check(lambda: structurer.convert(data.get("reference", {}), dict[str, float], "reference"), {})
    # A broken [experiment] may name plugins not loaded: the components cannot be checked.
    if errors.errors and not (defer_errors and experiment is not None and dataset is not None):
        errors.raise_all()
    return Recipe(file, data, experiment, train or TrainSection(), dataset, stages, loggers, reference, overridden or set(),
                  errors.errors)


def _parse_stages(structurer: Structurer, raw_stages: Any, train: TrainSection, errors: ErrorList) -> list[StageSection]:
    """The ``[[stages]]`` tables that are valid; an error for each one that is not."""
    if raw_stages is None:
        errors.errors.append(structurer.error("stages", "no stages: the recipe trains nothing",
                                              'add at least one [[stages]] table with id = "..." and a [stages.scheme]'))
        return []
    if not isinstance(raw_stages, list) or not raw_stages:
        errors.errors.append(structurer.error("stages", "expected one or more [[stages]] tables", "write each stage as [[stages]]"))
        return []
    seen_ids: dict[str, int] = {}
    stages = [errors.check(lambda: _parse_stage(structurer, raw, index, train, seen_ids)) for index, raw in enumerate(raw_stages)]
    return [stage for stage in stages if stage is not None]


def _parse_loggers(structurer: Structurer, raw_loggers: Any) -> list[RawComponent]:
    if not isinstance(raw_loggers, list):
        raise structurer.error("loggers", f"expected a list, got {raw_loggers!r}", 'write loggers = ["console", "files"]')
    errors = ErrorList()
    loggers = [errors.check(lambda: _raw_component(structurer, item, f"loggers[{i}]")) for i, item in enumerate(raw_loggers)]
    errors.raise_all()
    return loggers


def _stage_id(structurer: Structurer, raw: dict, key: str, seen_ids: dict[str, int]) -> str:
    stage_id = raw.get("id")
    if stage_id is None:
        raise structurer.error(f"{key}.id", "required key is missing", 'give every stage a unique id, e.g. id = "teacher"')
    if not isinstance(stage_id, str) or not STAGE_ID.match(stage_id):
        raise structurer.error(f"{key}.id", f"invalid stage id {stage_id!r}", "use letters, digits, '-', '_' or '.' (it names a folder)")
    if stage_id in seen_ids:
        raise structurer.error(f"{key}.id", f"duplicate stage id {stage_id!r} (also stages[{seen_ids[stage_id]}])", "give every stage a unique id")
    return stage_id


def _parse_stage(structurer: Structurer, raw: Any, index: int, train: TrainSection, seen_ids: dict[str, int]) -> StageSection:
    """One ``[[stages]]`` table: its keys, a unique id, and its ``[stages.train]`` over ``[train]``;
    every independent error of the table at once."""
    key = f"stages[{index}]"
    if not isinstance(raw, dict):
        raise structurer.error(key, f"expected a table, got {raw!r}", "write each stage as [[stages]]")
    errors = ErrorList()
    for stage_key in (k for k in raw if k not in STAGE_KEYS):
        hint = did_you_mean(stage_key, STAGE_KEYS)
        errors.errors.append(structurer.error(f"{key}.{stage_key}", f"unknown key {stage_key!r}; valid keys: {', '.join(STAGE_KEYS)}",
                                              f"{hint}scheme-specific keys go in [stages.scheme]"))
    stage_id = errors.check(lambda: _stage_id(structurer, raw, key, seen_ids))
    if stage_id is not None:
        seen_ids[stage_id] = index
    if "scheme" not in raw:
        errors.errors.append(structurer.error(f"{key}.scheme", "required key is missing",
                                              'add scheme = "scratch" (or "kd", ...) or a [stages.scheme] table'))
    stage_train = raw.get("train", {})
    if not isinstance(stage_train, dict):
        errors.errors.append(structurer.error(f"{key}.train", "expected a table", "write [stages.train] with the keys to override"))
        stage_train = {}
    # Only the stage's own keys are checked here: [train] under them already was.
    settings = errors.check(lambda: structurer.evolve(train, stage_train, f"{key}.train"))
    components = {part: errors.check(lambda: _raw_component(structurer, raw[part], f"{key}.{part}"))
                  for part in ("scheme", "model", "loss") if part in raw}
    errors.raise_all()
    return StageSection(id=stage_id, index=index, scheme=components["scheme"], model=components.get("model"),
                        loss=components.get("loss"), train=settings, train_overrides=stage_train)


def _raw_component(structurer: Structurer, value: Any, key: str) -> RawComponent:
    if isinstance(value, str):  # shorthand: scheme = "kd"
        return RawComponent(value, {}, key, shorthand=True)
    if not isinstance(value, dict):
        raise structurer.error(key, f"expected a component name or a table with name = ..., got {value!r}", f'write {key.split(".")[-1]} = {{ name = "..." }}')
    if "name" not in value:
        raise structurer.error(f"{key}.name", "required key is missing", 'add name = "..." naming the plugin component')
    name = value["name"]
    if not isinstance(name, str):
        raise structurer.error(f"{key}.name", f"expected a string, got {name!r}", 'put the name in quotes')
    params = {k: v for k, v in value.items() if k != "name"}
    return RawComponent(name, params, key)


def dump_toml(data: dict[str, Any]) -> str:
    """Write recipe data back as TOML (the resolved recipe stored in a run)."""
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not _is_table(v) and not _is_table_array(v)}
    for key, value in scalars.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in data.items():
        if _is_table(value):
            _dump_table(lines, [key], value)
        elif _is_table_array(value):
            for item in value:
                _dump_table(lines, [key], item, array=True)
    return "\n".join(lines) + "\n"


def _dump_table(lines: list[str], path: list[str], table: dict, array: bool = False) -> None:
    header = ".".join(_toml_key(p) for p in path)
    lines.append("")
    lines.append(f"[[{header}]]" if array else f"[{header}]")
    for key, value in table.items():
        if not _is_table(value) and not _is_table_array(value):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        if _is_table(value):
            _dump_table(lines, path + [key], value)
        elif _is_table_array(value):
            for item in value:
                _dump_table(lines, path + [key], item, array=True)


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def format_toml_value(value: Any) -> str:
    """``value`` written as TOML (``true``, ``"kd"``, ``[1, 2]``, ``{ a = 1 }``)."""
    return _toml_value(value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")
