"""The parameter reference: every key of every component (built-in or a third-party
plugin's) and of the host's own sections, read from the ``Params`` classes — name,
type, default, range (from the validators' ``describe``) and help (the field's
``metadata["help"]``). ``pyramidkd plugins --params`` prints it; ``docs/reference.md``
is its markdown for the built-in components (``--params --markdown``)."""

from __future__ import annotations

import typing
from typing import Any

import attrs

from ..errors import UserError, did_you_mean
from ..formatting import format_markdown_table
from ..recipe import format_toml_value
from ..settings import ExperimentSection, OptimizerSection, SchedulerSection, TrainSection
from ..validation import describe_type, describe_validator

# The host's own sections: (name, where they are written, class).
HOST_SECTIONS = (
    ("experiment", "[experiment]", ExperimentSection),
    ("train", "[train], and per stage [stages.train] over it", TrainSection),
    ("train.optimizer", "[train.optimizer] (or [stages.train.optimizer])", OptimizerSection),
    ("train.scheduler", "[train.scheduler] (or [stages.train.scheduler])", SchedulerSection),
)
KIND_TITLES = {"scheme": "Schemes", "loss": "Losses", "model": "Models", "dataset": "Datasets", "logger": "Loggers",
               "launcher": "Launchers"}
WHERE = {  # how a recipe (or a sweep file, for a launcher) names a component of each kind
    "scheme": '[stages.scheme] with name = "{}" (or scheme = "{}")',
    "model": '[stages.model] with name = "{}"',
    "loss": '[stages.loss] with name = "{}" (or loss = "{}")',
    "dataset": '[dataset] with name = "{}"',
    "logger": 'loggers = [{{ name = "{}", ... }}]',
    "launcher": 'a sweep file\'s [launcher] with name = "{}"',
}
REGENERATE = ".venv/bin/pyramidkd plugins --params --markdown > docs/reference.md"


def describe_default(field: attrs.Attribute) -> str:
    """The field's default as TOML, ``(required)`` without one, ``(not set)`` for ``None``."""
    default = field.default
    if default is attrs.NOTHING:
        return "(required)"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        if default.takes_self:
            return "(computed)"
        default = default.factory()
    if default is None:
        return "(not set)"
    if attrs.has(type(default)):
        return "(its own section)"
    if default == {}:
        return "{}"
    try:
        return format_toml_value(default)
    except TypeError:
        return repr(default)


def params_rows(params_class: type) -> list[dict[str, Any]]:
    """One row per key of an attrs ``Params`` class: key, type, default, range, help."""
    if not attrs.has(params_class):
        return []
    hints = typing.get_type_hints(params_class)
    return [{
        "key": field.name,
        "type": describe_type(hints.get(field.name, Any)),
        "default": describe_default(field),
        "range": describe_validator(field.validator) or "",
        "help": field.metadata.get("help", ""),
    } for field in attrs.fields(params_class) if field.init]


def host_section_entries() -> list[dict[str, Any]]:
    return [{"kind": "section", "name": name, "where": where, "plugin": "pyramidkd.engine", "source": "builtin",
             "summary": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "", "params": params_rows(cls)}
            for name, where, cls in HOST_SECTIONS]


def component_entries(host, *, builtin_only: bool = False) -> list[dict[str, Any]]:
    """Every registered component with its parameters, by kind then name."""
    entries = []
    for kind, registry in host.registries.items():
        for name in registry.names():
            plugin = registry.provider(name)
            origin = host.origins.get(plugin)
            source = origin.source if origin else "run"
            if builtin_only and source != "builtin":
                continue
            cls = registry.get(name)
            entries.append({"kind": kind, "name": name, "where": WHERE.get(kind, "{}").format(name, name), "plugin": plugin,
                            "source": source, "summary": cls.summary(), "params": params_rows(cls.Params)})
    return entries


def reference_entries(host, name: str | None = None, *, builtin_only: bool = False) -> list[dict[str, Any]]:
    """The host's sections and every component; ``name`` keeps the entries of that
    name (a component's, in every kind that has it, or a section's: ``train``)."""
    entries = host_section_entries() + component_entries(host, builtin_only=builtin_only)
    if name is None:
        return entries
    chosen = [entry for entry in entries if entry["name"] == name]
    if not chosen:
        names = sorted({entry["name"] for entry in entries})
        raise UserError(f"no component or section named {name!r}", key="--params",
                        fix=f"{did_you_mean(name, names)}see `pyramidkd plugins` for the names")
    return chosen


def format_reference_text(entries: list[dict[str, Any]]) -> str:
    blocks = []
    for entry in entries:
        title = f"[{entry['name']}]" if entry["kind"] == "section" else f"{entry['kind']} {entry['name']!r}"
        lines = [f"{title}  ({entry['plugin']})", f"  {entry['where']}"]
        if entry["summary"]:
            lines.append(f"  {entry['summary']}")
        width = max((len(row["key"]) for row in entry["params"]), default=0)
        for row in entry["params"]:
            facts = ", ".join(part for part in (row["type"], f"default {row['default']}", row["range"]) if part)
            lines.append(f"    {row['key']:<{width}}  {facts}")
            if row["help"]:
                lines.append(f"    {'':<{width}}    {row['help']}")
        if not entry["params"]:
            lines.append("    (no parameters)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_reference_markdown(entries: list[dict[str, Any]]) -> str:
    """``docs/reference.md``: the host's sections, then the components grouped by kind."""
    lines = ["# Parameter reference", "",
             f"Generated from the `Params` classes by `{REGENERATE.split(' > ')[0]}`; do not edit by hand",
             f"(`{REGENERATE}` regenerates it, and a test checks that it is current).",
             "Every key is optional unless its default says `(required)`; `pyramidkd plugins --params NAME`",
             "prints the same for any installed component, third-party plugins included.", ""]
    groups: dict[str, list[dict]] = {}
    for entry in entries:
        groups.setdefault(entry["kind"], []).append(entry)
    for kind, members in groups.items():
        lines += [f"## {'Recipe sections' if kind == 'section' else KIND_TITLES.get(kind, kind)}", ""]
        for entry in members:
            title = f"`[{entry['name']}]`" if kind == "section" else f"`{entry['name']}`"
            lines += [f"### {title}", "", entry["summary"], f"Written as {entry['where']}.", ""]
            rows = [{k: _markdown_cell(v, k) for k, v in row.items()} for row in entry["params"]]
            lines += [format_markdown_table(rows) if rows else "No parameters.", ""]
    return "\n".join(line for line in _squeeze(lines)) + "\n"


def _markdown_cell(value: str, column: str) -> str:
    if not value:
        return ""
    return f"`{value}`" if column in ("key", "default") else value.replace("\n", " ")


def _squeeze(lines: list[str]):
    """The lines without runs of blank ones."""
    previous = None
    for line in lines:
        if line or previous:
            yield line
        previous = line
