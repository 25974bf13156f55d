"""``pyramidkd validate RECIPE``: every check short of training (of a recipe, a sweep or a search file)."""

from __future__ import annotations

import argparse

from .arguments import add_recipe_arguments

NAME = "validate"
HELP = "check a recipe and its plugins without training"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)


def _source(teacher) -> str:
    return getattr(teacher, "stage_id", None) or getattr(teacher, "path", None) or "?"


def execute(args: argparse.Namespace) -> int:
    from ..recipe import read_toml
    from ..runner import dataset_context, prepare

    if "sweep" in read_toml(args.recipe):  # a sweep file: every cell is checked
        from ..sweeps.sweep import validate_sweep

        print(validate_sweep(args.recipe, args.overrides))
        return 0
    if "search" in read_toml(args.recipe):  # a search file: its recipe at both ends of every range
        from ..search.search import describe, plan_search

        print(f"{args.recipe}: ok\n{describe(plan_search(args.recipe))}")
        return 0
    prepared = prepare(args.recipe, args.overrides)
    prepared.dataset.instantiate().check(dataset_context(prepared.recipe))
    print(f"{args.recipe}: ok — {len(prepared.stages)} stage(s): {', '.join(s.id for s in prepared.stages)}")
    for stage in prepared.stages:
        teachers = ", ".join(_source(t) for t in stage.teachers) or "-"
        print(f"  {stage.id}: model {stage.model.name}, loss {stage.loss.name}, teacher {teachers}, {stage.train.epochs} epochs")
    return 0
