"""Runs a recipe: prepare (validate, plan), then every stage with the same loop
(:mod:`pyramidkd.engine.stage`), reusing stages an earlier run of the same recipe
completed and resuming the one it left unfinished.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Iterable, Sequence

import attrs
import torch

from .distributed import World, barrier, broadcast_object, init_world
from .components import ComponentSpec, DatasetContext, DataSplits, StagePlan
from .errors import RecipeError, RunDirectoryError
from .host import PluginHost, make_plugin_host
from .planning import plan_recipe
from .recipe import Recipe, dump_toml, load_recipe, resolve_component
from .rundir import RunDirectory, atomic_write_json, command_line, default_output_dir, load_checkpoint
from .stage import RunInterrupted, StageRunner, StopFlag, TrainingError  # noqa: F401  (re-exported)


@attrs.define
class PreparedRun:
    """A recipe that passed every check short of training."""

    recipe: Recipe
    host: PluginHost
    stages: list[StagePlan]
    dataset: ComponentSpec
    loggers: list[ComponentSpec]


def prepare(recipe_path: str, overrides: Sequence[str] = (), extra_plugins: Iterable[object] = ()) -> PreparedRun:
    recipe = load_recipe(recipe_path, overrides)
    host = make_plugin_host(
        recipe.experiment.plugins,
        extra_plugins=extra_plugins,
        local_search_path=recipe.directory,
        recipe_file=recipe.file,
    )
    registries = host.registries
    dataset = resolve_component(recipe, registries, "dataset", recipe.dataset)
    loggers = [resolve_component(recipe, registries, "logger", raw) for raw in recipe.loggers]
    stages = plan_recipe(recipe, registries)
    for stage_id in recipe.reference:
        if not any(stage.id == stage_id or stage.entry_id == stage_id for stage in stages):
            raise RecipeError(
                f"reference for unknown stage {stage_id!r}",
                file=recipe.file,
                key=f"reference.{stage_id}",
                fix=f"use a stage id: {', '.join(s.id for s in stages)}",
            )
    return PreparedRun(recipe, host, stages, dataset, loggers)


def dataset_context(recipe: Recipe) -> DatasetContext:
    cache = os.environ.get("PYRAMIDKD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pyramidkd"))
    return DatasetContext(seed=recipe.experiment.seed, recipe_dir=recipe.directory, cache_dir=cache)


def choose_device(recipe: Recipe) -> torch.device:
    wanted = recipe.experiment.device
    if wanted == "cuda" and not torch.cuda.is_available():
        key = "experiment.device"
        raise RecipeError("device = \"cuda\" but no CUDA GPU is visible", file=recipe.file, key=key, fix='use device = "auto" or "cpu"')
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


@attrs.define
class Run:
    """What lifecycle hooks receive as ``run``."""

    recipe: Recipe
    directory: RunDirectory
    device: torch.device
    stages: list[StagePlan]
    host: PluginHost
    data: DataSplits
    quiet: bool
    seed: int
    world: World = attrs.field(factory=World)
    results: dict[str, dict] = attrs.field(factory=dict)
    started: float = attrs.field(factory=time.time)
    completed: set[str] = attrs.field(factory=set)  # stages reused from an earlier run
    resume_stage: str | None = None  # the stage continued from its `last` checkpoint
    resume_history: list[dict] = attrs.field(factory=list)  # its epoch records so far

    def reference_for(self, stage: StagePlan) -> float | None:
        """The published accuracy for a stage: by its id, or by its entry's id when
        it is that entry's final stage."""
        reference = self.recipe.reference
        if stage.id in reference:
            return reference[stage.id]
        last_of_entry = [s.id for s in self.stages if s.entry_id == stage.entry_id][-1]
        return reference.get(stage.entry_id) if stage.id == last_of_entry else None

    def call(self, hook_name: str, on_error=None, **kwargs) -> None:
        """Call a lifecycle hook; a plugin that raises is named (after ``on_error``
        has saved the run state)."""
        if self.world.is_main:  # loggers and callbacks live on rank 0 only
            self.host.call(hook_name, on_error=on_error, run=self, **kwargs)


def run_recipe(
    recipe_path: str,
    overrides: Sequence[str] = (),
    *,
    output: str | None = None,
    quiet: bool = False,
    force: bool = False,
    resume: bool = False,
    extra_plugins: Iterable[object] = (),
) -> dict:
    """Run a whole recipe; return the summary (also written to summary.json).

    Into a folder that holds the same recipe, completed stages are reused and an
    unfinished one continues from its ``last`` checkpoint. ``resume`` insists on
    such a folder; with ``force`` a changed recipe is accepted there. ``force``
    without ``resume`` recomputes every stage.
    """
    prepared = prepare(recipe_path, overrides, extra_plugins)
    recipe = prepared.recipe
    device = choose_device(recipe)
    world = init_world(device.type == "cuda")
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    if resume and not output:
        raise RunDirectoryError("--resume needs the run's folder", fix="add --output DIR (the folder of the run to continue)")
    # Under torchrun every rank must agree on the folder (the default one has a timestamp).
    directory = RunDirectory(broadcast_object(world, output or default_output_dir(recipe.experiment.name)))
    if not world.is_main:  # rank 0 owns the folder; the others read checkpoints from it
        barrier(world)
        return _run_locked(prepared, directory, device, world, quiet=quiet, recompute=force and not resume)
    with directory.lock():
        try:
            directory.prepare(dump_toml(recipe.data), resume=resume, force=force)
        finally:
            barrier(world)
        return _run_locked(prepared, directory, device, world, quiet=quiet, recompute=force and not resume)


def _run_locked(prepared: PreparedRun, directory: RunDirectory, device: torch.device, world: World, *, quiet: bool, recompute: bool) -> dict:
    recipe, host = prepared.recipe, prepared.host
    data = prepared.dataset.instantiate().load(dataset_context(recipe))
    if recipe.experiment.threads:
        torch.set_num_threads(recipe.experiment.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    run = Run(recipe, directory, device, prepared.stages, host, data, quiet, recipe.experiment.seed, world=world)
    results = {} if recompute else {s.id: directory.stage_result(s.id) for s in prepared.stages}
    run.completed = {stage_id for stage_id, result in results.items() if result is not None}
    resume_checkpoint = None
    unfinished = next((s for s in prepared.stages if s.id not in run.completed), None)
    if unfinished is not None and not recompute and os.path.exists(directory.checkpoint(unfinished.id, "last")):
        resume_checkpoint = load_checkpoint(directory.checkpoint(unfinished.id, "last"))
        if "progress" not in resume_checkpoint:
            raise RunDirectoryError(f"{directory.checkpoint(unfinished.id, 'last')} holds no training state", fix="re-run with --force")
        run.resume_stage = unfinished.id
        run.resume_history = list(resume_checkpoint["progress"]["history"])

    if world.is_main:
        for index, spec in enumerate(prepared.loggers):
            host.register_run_plugin(spec.instantiate(), name=f"logger:{spec.name}:{index}")
        directory.write_manifest(seed=run.seed, device=str(device), recipe_file=recipe.file, started=run.started, finished=None,
                                 argv=command_line(), world_size=world.size)
    run.call("pyramidkd_run_start")
    teacher_cache: dict = {}
    stop = StopFlag()
    with _signals_to(stop):
        for stage in prepared.stages:
            if stage.id in run.completed:
                result = {**results[stage.id], "skipped": True}
            else:
                runner = StageRunner(run, stage, teacher_cache, stop)
                result = runner.execute(resume_checkpoint if stage.id == run.resume_stage else None)
                if world.is_main:
                    atomic_write_json(directory.stage_result_file(stage.id), result)
                barrier(world)  # the next stage may load this stage's best checkpoint
            run.results[stage.id] = result
            run.call("pyramidkd_stage_end", stage=stage, result=result)
    finished = time.time()
    summary = {
        "experiment": recipe.experiment.name,
        "recipe": os.path.abspath(recipe.file),
        "seed": run.seed,
        "device": str(device),
        "dataset": {"name": prepared.dataset.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
                    "train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "stages": [run.results[stage.id] for stage in prepared.stages],
        "time_s": round(finished - run.started, 3),
    }
    if world.is_main:
        atomic_write_json(directory.file("summary.json"), summary)
        directory.write_manifest(seed=run.seed, device=str(device), recipe_file=recipe.file, started=run.started, finished=finished,
                                 argv=command_line(), world_size=world.size)
    run.call("pyramidkd_run_end", summary=summary)
    return summary


class _signals_to:
    """Route SIGINT/SIGTERM to a stop flag while a run trains (main thread only):
    the current step finishes, ``last`` is saved, and the run exits cleanly."""

    def __init__(self, stop: StopFlag):
        self.stop = stop
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.stop.request)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False
