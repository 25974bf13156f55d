"""Which ``--set`` training values some stages do not train with, because a
stage-level setting shadows them: ``[stages.train]``, or a scheme's own (a Pyramid
scheme's ``stage1_epochs``). One line each, logged before a run starts."""

from __future__ import annotations

from typing import Any

import attrs

from .components import StagePlan
from .recipe import Recipe, StageSection, leaf_paths, lookup_key_path, parse_key_path

_MISSING = object()


def shadowed_overrides(recipe: Recipe, stages: list[StagePlan], max_epochs: int | None = None) -> list[str]:
    """One line per ``--set`` training value that some stages do not train with.
    ``max_epochs``: the cap already applied to ``stages``, so a ``--set`` epoch count
    counts as reaching a stage capped below it."""
    notes = []
    for path in sorted(recipe.overridden):
        for leaf, value in _leaves(path, lookup_key_path(recipe.data, path)):
            note = _shadowed_leaf(recipe, stages, leaf, value, max_epochs)
            if note:
                notes.append(note)
    return notes


def _shadowed_leaf(recipe: Recipe, stages: list[StagePlan], leaf: str, value: Any, max_epochs: int | None) -> str | None:
    """The line for one ``--set`` value (``leaf``: its key path), if some stage shadows it."""
    target = _training_setting(recipe, leaf)
    if target is None:
        return None
    setting, entries = target
    wanted = min(value, max_epochs) if setting == ["epochs"] and max_epochs and isinstance(value, int) else value
    sections = {section.id: section for section in recipe.stages}
    by_source: dict[str, list[str]] = {}
    for stage in stages:
        section = sections.get(stage.entry_id)
        if section is None or (entries is not None and stage.entry_id not in entries):
            continue
        source = _shadowing_source(recipe, section, stage, setting, wanted, across_stages=entries is None)
        if source is not None:
            by_source.setdefault(source, []).append(stage.id)
    if not by_source:
        return None
    where = "; ".join(f"{', '.join(ids)} ({source})" for source, ids in by_source.items())
    count = sum(len(ids) for ids in by_source.values())
    hint = "; --max-epochs N caps every stage" if setting == ["epochs"] else ""
    return f"--set {leaf}={_show(value)} does not reach {count} stage(s) that set their own: {where}{hint}"


def _training_setting(recipe: Recipe, leaf: str) -> tuple[list, set[str] | None] | None:
    """The training setting a ``--set`` key path sets, and the entries it is meant for
    (``None``: every entry, from ``[train]``); ``None`` for a key outside training."""
    parts = parse_key_path(leaf)
    if parts[:1] == ["train"]:
        return parts[1:], None
    if len(parts) > 3 and parts[0] == "stages" and isinstance(parts[1], int) and parts[2] == "train":
        return parts[3:], {recipe.stages[parts[1]].id} if parts[1] < len(recipe.stages) else set()
    return None


def _shadowing_source(recipe: Recipe, section: StageSection, stage: StagePlan, setting: list, wanted: Any, *,
                      across_stages: bool) -> str | None:
    """Where the stage's own value of ``setting`` comes from, when it is not ``wanted``."""
    actual = _attribute(stage.train, setting)
    if actual is _MISSING or actual == wanted:
        return None
    own = f"stages[{section.index}].train.{'.'.join(map(str, setting))}"
    if across_stages and tuple(setting) in leaf_paths(section.train_overrides):
        if own in recipe.overridden:
            return None  # both set from the command line: the stage's is meant
        return f"{_show(actual)}, from {own}"
    return f"{_show(actual)}, from scheme {section.scheme.name!r} of stages[{section.index}]"


def _leaves(path: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves(f"{path}.{key}", item)]
    return [(path, value)]


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
