"""Recipes: one TOML file describing a whole experiment.

Loading happens in two steps. :func:`load_recipe` reads the file, applies
``--set`` overrides and validates the host's own keys (``[experiment]``,
``[train]``, the shape of ``[[stages]]``). :func:`resolve_components` then looks
every ``name = ...`` up in the plugin registries and validates that component's
own parameters with its ``Params`` class.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from typing import Any, Literal

import attrs

from .components import ComponentSpec
from .errors import RecipeError
from .validation import Structurer, between, non_negative, positive

# --- the host's own sections ------------------------------------------------


@attrs.define
class ExperimentSection:
    name: str = attrs.field(default="experiment", metadata={"help": "used for the default output folder"})
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    plugins: list[str] = attrs.field(factory=list, metadata={"help": "local plugin modules to load"})
    threads: int = attrs.field(default=0, validator=non_negative, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    description: str = ""


@attrs.define
class OptimizerSection:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = attrs.field(default=0.05, validator=positive, metadata={"help": "learning rate, e.g. 0.05 for SGD, 1e-3 for Adam"})
    momentum: float = attrs.field(default=0.9, validator=between(0.0, 1.0))
    weight_decay: float = attrs.field(default=5e-4, validator=non_negative)
    nesterov: bool = False


@attrs.define
class SchedulerSection:
    name: Literal["none", "cosine", "step", "plateau"] = "cosine"
    step_size: int = attrs.field(default=30, validator=positive, metadata={"help": "epochs between decays (step)"})
    gamma: float = attrs.field(default=0.1, validator=positive)
    factor: float = attrs.field(default=0.1, validator=between(0.0, 1.0), metadata={"help": "plateau decay factor"})
    patience: int = attrs.field(default=5, validator=non_negative)
    min_lr: float = attrs.field(default=0.0, validator=non_negative)


@attrs.define
class TrainSection:
    epochs: int = attrs.field(default=10, validator=positive, metadata={"help": "number of epochs, e.g. 10"})
    batch_size: int = attrs.field(default=64, validator=positive, metadata={"help": "e.g. 64"})
    eval_batch_size: int = attrs.field(default=256, validator=positive)
    num_workers: int = attrs.field(default=0, validator=non_negative)
    grad_clip: float = attrs.field(default=0.0, validator=non_negative, metadata={"help": "max gradient norm; 0 = off"})
    on_nan: Literal["stop", "skip-batch"] = attrs.field(default="stop", metadata={"help": "what a non-finite loss does"})
    precision: Literal["fp32", "bf16", "fp16"] = attrs.field(default="fp32", metadata={"help": "autocast precision (fp16 uses a GradScaler)"})
    channels_last: bool = False
    compile: bool = attrs.field(default=False, metadata={"help": "torch.compile the student and teacher forward"})
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = attrs.field(default=2, validator=positive, metadata={"help": "batches each worker loads ahead"})
    optimizer: OptimizerSection = attrs.field(factory=OptimizerSection)
    scheduler: SchedulerSection = attrs.field(factory=SchedulerSection)


@attrs.define
class RawComponent:
    """``name = "..."`` plus that component's own (not yet validated) keys."""

    name: str
    params: dict[str, Any]
    key: str


@attrs.define
class StageSection:
    id: str
    index: int
    scheme: RawComponent
    model: RawComponent | None
    loss: RawComponent | None
    train: dict[str, Any]


@attrs.define
class Recipe:
    """A recipe after step one: host keys validated, components still raw."""

    file: str
    data: dict[str, Any]  # the resolved TOML data (overrides applied)
    experiment: ExperimentSection
    train: dict[str, Any]
    dataset: RawComponent
    stages: list[StageSection]
    loggers: list[RawComponent]
    reference: dict[str, float]
    overridden: set[str]

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
    ids = [item.get("id") for item in node if isinstance(item, dict)]
    raise RecipeError(f"--set {text}: no entry with id {part!r}; ids: {', '.join(map(str, ids))}", file=file, key=where, fix="use one of the ids or an index")


# --- step one: host keys --------------------------------------------------------


def load_recipe(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    data = read_toml(path)
    overridden = apply_overrides(data, list(overrides), path)
    return parse_recipe(data, path, overridden)


def parse_recipe(data: dict[str, Any], file: str, overridden: set[str] | None = None) -> Recipe:
    structurer = Structurer(file, overridden or set())
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            import difflib

            close = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1)
            hint = f"did you mean [{close[0]}]? " if close else ""
            raise structurer.error(key, f"unknown section {key!r}; valid sections: {', '.join(TOP_LEVEL_KEYS)}", f"{hint}remove or rename it")

    experiment = structurer.structure(ExperimentSection, data.get("experiment", {}), "experiment")
    train = data.get("train", {})
    structurer.structure(TrainSection, train, "train")  # validated now; merged per stage later

    if "dataset" not in data:
        raise structurer.error("dataset", "required section is missing", 'add [dataset] with name = "digits" (or another dataset plugin)')
    dataset = _raw_component(structurer, data["dataset"], "dataset")

    raw_stages = data.get("stages")
    if raw_stages is None:
        raise structurer.error("stages", "no stages: the recipe trains nothing", 'add at least one [[stages]] table with id = "..." and a [stages.scheme]')
    if not isinstance(raw_stages, list) or not raw_stages:
        raise structurer.error("stages", "expected one or more [[stages]] tables", "write each stage as [[stages]]")
    stages = []
    seen_ids: dict[str, int] = {}
    for index, raw in enumerate(raw_stages):
        key = f"stages[{index}]"
        if not isinstance(raw, dict):
            raise structurer.error(key, f"expected a table, got {raw!r}", "write each stage as [[stages]]")
        for stage_key in raw:
            if stage_key not in STAGE_KEYS:
                import difflib

                close = difflib.get_close_matches(stage_key, STAGE_KEYS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise structurer.error(f"{key}.{stage_key}", f"unknown key {stage_key!r}; valid keys: {', '.join(STAGE_KEYS)}", f"{hint}scheme-specific keys go in [stages.scheme]")
        stage_id = raw.get("id")
        if stage_id is None:
            raise structurer.error(f"{key}.id", "required key is missing", 'give every stage a unique id, e.g. id = "teacher"')
        if not isinstance(stage_id, str) or not STAGE_ID.match(stage_id):
            raise structurer.error(f"{key}.id", f"invalid stage id {stage_id!r}", "use letters, digits, '-', '_' or '.' (it names a folder)")
        if stage_id in seen_ids:
            raise structurer.error(f"{key}.id", f"duplicate stage id {stage_id!r} (also stages[{seen_ids[stage_id]}])", "give every stage a unique id")
        seen_ids[stage_id] = index
        if "scheme" not in raw:
            raise structurer.error(f"{key}.scheme", "required key is missing", 'add scheme = "scratch" (or "kd", ...) or a [stages.scheme] table')
        stage_train = raw.get("train", {})
        if not isinstance(stage_train, dict):
            raise structurer.error(f"{key}.train", "expected a table", "write [stages.train] with the keys to override")
        stages.append(
            StageSection(
                id=stage_id,
                index=index,
                scheme=_raw_component(structurer, raw["scheme"], f"{key}.scheme"),
                model=_raw_component(structurer, raw["model"], f"{key}.model") if "model" in raw else None,
                loss=_raw_component(structurer, raw["loss"], f"{key}.loss") if "loss" in raw else None,
                train=stage_train,
            )
        )

    raw_loggers = data.get("loggers", DEFAULT_LOGGERS)
    if not isinstance(raw_loggers, list):
        raise structurer.error("loggers", f"expected a list, got {raw_loggers!r}", 'write loggers = ["console", "files"]')
    loggers = [_raw_component(structurer, item, f"loggers[{i}]") for i, item in enumerate(raw_loggers)]

    reference = structurer.convert(data.get("reference", {}), dict[str, float], "reference")
    return Recipe(file, data, experiment, train, dataset, stages, loggers, reference, overridden or set())


def _raw_component(structurer: Structurer, value: Any, key: str) -> RawComponent:
    if isinstance(value, str):  # shorthand: scheme = "kd"
        return RawComponent(value, {}, key)
    if not isinstance(value, dict):
        raise structurer.error(key, f"expected a component name or a table with name = ..., got {value!r}", f'write {key.split(".")[-1]} = {{ name = "..." }}')
    if "name" not in value:
        raise structurer.error(f"{key}.name", "required key is missing", 'add name = "..." naming the plugin component')
    name = value["name"]
    if not isinstance(name, str):
        raise structurer.error(f"{key}.name", f"expected a string, got {name!r}", 'put the name in quotes')
    params = {k: v for k, v in value.items() if k != "name"}
    return RawComponent(name, params, key)


# --- step two: components -------------------------------------------------------


def resolve_component(recipe: Recipe, registries: dict, kind: str, raw: RawComponent) -> ComponentSpec:
    cls = registries[kind].get(raw.name, file=recipe.file, key=f"{raw.key}.name" if not _is_shorthand(recipe, raw) else raw.key)
    params = recipe.structurer().structure(cls.Params, raw.params, raw.key)
    return ComponentSpec(cls, params, raw.key)


def _is_shorthand(recipe: Recipe, raw: RawComponent) -> bool:
    return not raw.params and isinstance(_lookup(recipe.data, raw.key), str)


def _lookup(data: Any, key: str) -> Any:
    node = data
    for part in parse_key_path(key):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def stage_train_section(recipe: Recipe, stage: StageSection, defaults: dict | None = None) -> TrainSection:
    """Merge ``[train]`` (and a scheme's defaults) with ``[stages.train]`` and validate."""
    merged = _deep_merge(copy.deepcopy(defaults or {}), recipe.train)
    merged = _deep_merge(merged, stage.train)
    return recipe.structurer().structure(TrainSection, merged, f"stages[{stage.index}].train")


def _deep_merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _deep_merge(dict(base[key]), value)
        else:
            base[key] = copy.deepcopy(value)
    return base


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
