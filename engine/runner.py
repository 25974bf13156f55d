"""Runs a recipe: prepare (validate, plan), then every stage with the same loop
(:mod:`pyramidkd.engine.training.loop`), reusing stages an earlier run of the same
recipe completed and resuming the one it left unfinished — when their fingerprints
(:mod:`pyramidkd.engine.training.fingerprint`) say they are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Iterable, Sequence

import attrs
import torch

from .distributed import World, barrier, broadcast_object, init_world, resolve_device
from .components import DataSplits
from .data.pipeline import load_run_data
from .errors import RecipeError, RunDirectoryError
from .host import make_plugin_host
from .lifecycle import Run
from .planning import PreparedRun, dataset_context, prepare_run
from .recipe import Recipe, dump_toml, load_recipe
from .records import DatasetInfo, RunSummary, write_summary
from .rundir import RunDirectory, atomic_write_json, command_line, default_output_dir
from .training.fingerprint import Fingerprints
from .training.loop import StageRunner
from .training.reuse import decide_reuse
from .training.stops import ImmediateStop, StopFlag, resume_command, signals_to

log = logging.getLogger("pyramidkd")


def prepare(recipe_path: str, overrides: Sequence[str] = (), extra_plugins: Iterable[object] = (), *,
            max_epochs: int | None = None) -> PreparedRun:
    """Load a recipe, build its plugin host, and plan and check it
    (:func:`~pyramidkd.engine.planning.prepare_run`). ``max_epochs`` caps every
    stage's epochs (scheme-planned stages included)."""
    recipe = load_recipe(recipe_path, overrides, defer_errors=True)  # raised with the components' errors
    host = make_plugin_host(
        recipe.experiment.plugins,
        extra_plugins=extra_plugins,
        local_search_path=recipe.directory,
        recipe_file=recipe.file,
    )
    return prepare_run(recipe, host, max_epochs=max_epochs)


def device_type(recipe: Recipe) -> str:
    """``"cuda"`` or ``"cpu"``, without touching a GPU (torchrun's ranks must pick theirs first)."""
    wanted = recipe.experiment.device
    if wanted == "cuda" and not torch.cuda.is_available():
        key = "experiment.device"
        raise RecipeError("device = \"cuda\" but no CUDA GPU is visible", file=recipe.file, key=key, fix='use device = "auto" or "cpu"')
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "cuda"


def choose_device(recipe: Recipe, world: World = World()) -> torch.device:
    """The run's device, resolved once to an index (``cuda:<current>``, under torchrun
    the local rank's): tensors report ``cuda:0``, and ``cuda:0 == cuda`` is False."""
    return resolve_device(torch.device(device_type(recipe)), world)


def run_recipe(
    recipe_path: str,
    overrides: Sequence[str] = (),
    *,
    output: str | None = None,
    quiet: bool = False,
    force: bool = False,
    resume: bool = False,
    extra_plugins: Iterable[object] = (),
    max_epochs: int | None = None,
) -> dict:
    """Run a whole recipe; return the summary (``RunSummary.to_dict()``, also
    written to summary.json).

    Into a folder that holds the same recipe, completed stages are reused and an
    unfinished one continues from its ``last`` checkpoint — each only when its
    fingerprint (its resolved plan, inputs included) is unchanged. ``resume``
    insists on such a folder; with ``force`` a changed recipe is accepted there.
    ``force`` without ``resume`` recomputes every stage. ``max_epochs`` caps every
    stage's epochs.
    """
    prepared = prepare(recipe_path, overrides, extra_plugins, max_epochs=max_epochs)
    recipe = prepared.recipe
    world = init_world(device_type(recipe) == "cuda")
    device = choose_device(recipe, world)
    if resume and not output:
        raise RunDirectoryError("--resume needs the run's folder", fix="add --output DIR (the folder of the run to continue)")
    # Under torchrun every rank must agree on the folder (the default one has a timestamp).
    directory = RunDirectory(broadcast_object(world, output or default_output_dir(recipe.experiment.name)))
    stop = StopFlag(resume_command(recipe_path, directory.path, overrides, max_epochs))
    recompute = force and not resume
    try:
        if not world.is_main:  # rank 0 owns the folder; the others read checkpoints from it
            barrier(world)
            return _run_locked(prepared, directory, device, world, quiet=quiet, recompute=recompute, stop=stop)
        with directory.lock():
            try:
                directory.prepare(dump_toml(recipe.data), resume=resume, force=force)
            finally:
                barrier(world)
            return _run_locked(prepared, directory, device, world, quiet=quiet, recompute=recompute, stop=stop)
    except ImmediateStop as immediate:  # a second signal: the same stop message as the first
        raise immediate.error from None


@contextlib.contextmanager
def _torch_settings(recipe: Recipe, device: torch.device):
    """The run's threads and determinism, restored afterwards: a run inside a
    longer process (a notebook, a test session) leaves its settings as they were.

    ``deterministic = true``: deterministic algorithms only (an op that has none is
    an error naming it, see :func:`_nondeterministic_op_error`), cuDNN autotuning
    off — the same seed gives the same run and a resume is exact. Uninitialised
    memory is not filled (that costs a pass over every allocation; nothing reads
    memory before writing it). ``false``: no deterministic algorithms, cuDNN
    autotuning on, TF32 matmuls and convolutions allowed — faster on GPUs, not
    bit-reproducible.
    """
    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    if recipe.experiment.threads:
        torch.set_num_threads(recipe.experiment.threads)
    if recipe.experiment.deterministic:
        torch.use_deterministic_algorithms(True)  # strict: no warn_only, a non-deterministic op is an error
        torch.utils.deterministic.fill_uninitialized_memory = False
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    try:
        yield
    except RuntimeError as error:
        raise _nondeterministic_op_error(error, recipe) or error
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.backends.cudnn.benchmark = benchmark
        torch.set_float32_matmul_precision(tf32[2])  # before allow_tf32: it sets that flag too
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32[0], tf32[1]


NONDETERMINISTIC = " does not have a deterministic implementation"  # PyTorch's words (alertNotDeterministic)


def _nondeterministic_op_error(error: RuntimeError, recipe: Recipe) -> RecipeError | None:
    """PyTorch's refusal of an op without a deterministic kernel, as the recipe's
    error naming the op and the fix; ``None`` for any other error."""
    text = str(error)
    if "CUBLAS_WORKSPACE_CONFIG" in text:  # the user's own setting, which setdefault keeps, is not a deterministic one
        return RecipeError("deterministic = true, but CUBLAS_WORKSPACE_CONFIG does not allow deterministic cuBLAS",
                           file=recipe.file, key="experiment.deterministic",
                           fix="unset CUBLAS_WORKSPACE_CONFIG (the run sets :4096:8) or set it to :4096:8 or :16:8; "
                               "or set deterministic = false")
    if NONDETERMINISTIC not in text:
        return None
    op = text.split(NONDETERMINISTIC, 1)[0].strip().splitlines()[-1]
    return RecipeError(
        f"deterministic = true, but {op} has no deterministic implementation on this device, so the run cannot be "
        "bit-reproducible", file=recipe.file, key="experiment.deterministic",
        fix="set deterministic = false (faster, not bit-reproducible; a resume continues correctly but not bit-exactly), "
            "or avoid the op (a plugin's model or loss)")


def _run_locked(prepared: PreparedRun, directory: RunDirectory, device: torch.device, world: World, *, quiet: bool,
                recompute: bool, stop: StopFlag) -> dict:
    data, choice, note = load_run_data(prepared.dataset, dataset_context(prepared.recipe), prepared.pipeline, device, world)
    prepared.check_data(data)
    if world.is_main:
        log.info(note)
    with _torch_settings(prepared.recipe, device):
        return _run_stages(prepared, directory, device, world, data, quiet=quiet, recompute=recompute, stop=stop,
                           pipeline=choice.pipeline)


def _run_stages(prepared: PreparedRun, directory: RunDirectory, device: torch.device, world: World, data: DataSplits, *,
                quiet: bool, recompute: bool, stop: StopFlag, pipeline: str) -> dict:
    recipe, host = prepared.recipe, prepared.host
    run = Run(recipe, directory, device, prepared.stages, host, data, quiet, recipe.experiment.seed, world=world, pipeline=pipeline)
    run.fingerprints = Fingerprints(prepared.stages, prepared.dataset, run.seed).by_stage
    reuse = decide_reuse(directory, prepared.stages, run.fingerprints, recompute=recompute)
    run.completed = set(reuse.reused)
    run.resume_stage, run.resume_history = reuse.resume_stage, reuse.resume_history
    if world.is_main:
        for line in reuse.messages():
            log.info(line)
        for index, spec in enumerate(prepared.loggers):
            host.register_run_plugin(spec.instantiate(), name=f"logger:{spec.name}:{index}")
        directory.write_manifest(seed=run.seed, device=str(device), recipe_file=recipe.file, started=run.started, finished=None,
                                 argv=command_line(), world_size=world.size)
    run.call("pyramidkd_run_start")
    teacher_cache: dict = {}
    with signals_to(stop):
        for stage in prepared.stages:
            if stage.id in reuse.reused:
                result = attrs.evolve(reuse.reused[stage.id], skipped=True)
            else:
                runner = StageRunner(run, stage, teacher_cache, stop, fingerprint=run.fingerprints[stage.id])
                result = runner.execute(reuse.resume_checkpoint if stage.id == reuse.resume_stage else None)
                if world.is_main:
                    atomic_write_json(directory.stage_result_file(stage.id), result.to_dict())
                barrier(world)  # the next stage may load this stage's best checkpoint
            run.results[stage.id] = result
            run.call("pyramidkd_stage_end", stage=stage, result=result)
    finished = time.time()
    summary = RunSummary(
        experiment=recipe.experiment.name,
        recipe=os.path.abspath(recipe.file),
        seed=run.seed,
        device=str(device),
        dataset=DatasetInfo(name=prepared.dataset.name, num_classes=data.num_classes, input_shape=list(data.input_shape),
                            train=len(data.train), val=len(data.val), test=len(data.test)),
        stages=tuple(run.results[stage.id] for stage in prepared.stages),
        time_s=round(finished - run.started, 3),  # this invocation's wall time
    )
    if world.is_main:
        write_summary(directory.path, summary)
        directory.write_manifest(seed=run.seed, device=str(device), recipe_file=recipe.file, started=run.started, finished=finished,
                                 argv=command_line(), world_size=world.size)
    run.call("pyramidkd_run_end", summary=summary)
    return summary.to_dict()
