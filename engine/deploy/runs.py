"""What an export reads from a run folder: a finished stage's best checkpoint, the
plugin host that rebuilds its model, and the stage's test images — loaded through
the run's own recipe and data set, as the run's test pass saw them."""

from __future__ import annotations

import json
import os
import tomllib
from typing import Iterator

import attrs
import torch

from ..errors import RunDirectoryError
from ..rundir import MANIFEST_FILE, RECIPE_FILE, RunDirectory

SUMMARY_FILE = "summary.json"


@attrs.define
class RunStage:
    """A finished stage of a run: its id, best checkpoint and ``result.json``."""

    run_dir: str
    stage_id: str
    checkpoint: str
    result: dict


def find_stage(run_dir: str, stage_id: str | None = None) -> RunStage:
    """Stage ``stage_id`` of the run in ``run_dir`` (default: its last finished stage);
    a missing folder, an unknown or unfinished stage, or no finished stage at all is a
    :class:`RunDirectoryError` that lists the stages."""
    directory = RunDirectory(run_dir)
    if not os.path.isfile(directory.file(RECIPE_FILE)):
        raise RunDirectoryError("not a run folder (no recipe.toml)", file=run_dir,
                                fix="give the folder a `pyramidkd run` wrote, e.g. runs/quickstart-20250101-120000")
    stages = stage_order(directory)
    finished = [stage for stage in stages if directory.stage_result(stage) is not None]
    if not finished:
        raise RunDirectoryError("the run has no finished stage (no stage wrote its best checkpoint and result yet)",
                                file=run_dir, fix="finish it first: pyramidkd run RECIPE --output RUN_DIR --resume")
    chosen = finished[-1] if stage_id is None else stage_id
    if chosen not in finished:
        state = "is not finished" if chosen in stages else "does not exist"
        listed = ", ".join(f"{s}{'' if s in finished else ' (unfinished)'}" for s in stages)
        raise RunDirectoryError(f"stage {chosen!r} {state} in this run; its stages: {listed}", file=run_dir,
                                fix=f"pass --stage with one of the finished stages, e.g. --stage {finished[-1]}")
    return RunStage(directory.path, chosen, directory.checkpoint(chosen), directory.stage_result(chosen))


def stage_order(directory: RunDirectory) -> list[str]:
    """The run's stages in the order it ran them: ``summary.json``'s, then any other
    stage folder by the time its result was written."""
    ordered: list[str] = []
    try:
        with open(directory.file(SUMMARY_FILE), encoding="utf-8") as handle:
            ordered = [stage["stage"] for stage in json.load(handle).get("stages", [])]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    folder = directory.file("checkpoints")
    others = [name for name in (os.listdir(folder) if os.path.isdir(folder) else []) if name not in ordered]
    written = {name: _mtime(directory.stage_result_file(name)) for name in others}
    return ordered + sorted(others, key=lambda name: (written[name], name))


def _mtime(path: str) -> float:
    return os.path.getmtime(path) if os.path.exists(path) else float("inf")


def run_recipe_and_host(run_dir: str):
    """The run's stored recipe (relative paths resolved against the folder of the
    recipe the run was started from) and a plugin host with its plugin modules."""
    from ..host import make_plugin_host
    from ..recipe import parse_recipe

    directory = RunDirectory(run_dir)
    stored = directory.file(RECIPE_FILE)
    with open(stored, "rb") as handle:
        data = tomllib.load(handle)
    origin = _original_recipe(directory) or stored
    recipe = parse_recipe(data, origin)
    host = make_plugin_host(recipe.experiment.plugins, local_search_path=recipe.directory, recipe_file=recipe.file)
    return recipe, host


def _original_recipe(directory: RunDirectory) -> str | None:
    try:
        with open(directory.file(MANIFEST_FILE), encoding="utf-8") as handle:
            path = json.load(handle).get("recipe_file")
    except (OSError, ValueError, AttributeError):
        return None
    return path if isinstance(path, str) and os.path.isdir(os.path.dirname(path)) else None


def load_test_split(recipe, host) -> torch.utils.data.Dataset:
    """The run's test split, on the CPU, through the run's data path (``[train] pipeline``)."""
    return load_run_splits(recipe, host).test


def load_run_splits(recipe, host):
    """The run's data splits (``DataSplits``), on the CPU, through the run's data path."""
    from ..data.pipeline import load_run_data
    from ..distributed import World
    from ..planning import ComponentResolver, dataset_context

    dataset = ComponentResolver(recipe, host.registries).resolve("dataset", recipe.dataset)
    data, _choice, _note = load_run_data(dataset, dataset_context(recipe), recipe.train.pipeline, torch.device("cpu"), World())
    return data


def test_batches(split, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised float images, labels) of ``split``, in order, on the CPU."""
    images = getattr(split, "images", None)
    if images is not None and hasattr(split, "labels"):  # a tensor split: normalised a batch at a time
        from ..data.splits import normalize

        for start in range(0, len(split), batch_size):
            batch = images[start : start + batch_size].cpu()
            pixels = normalize(batch, split.mean, split.std) if batch.dtype == torch.uint8 else batch
            yield pixels.float(), split.labels[start : start + batch_size].cpu()
        return
    loader = torch.utils.data.DataLoader(split, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch, labels in loader:
        yield batch.float(), torch.as_tensor(labels)
