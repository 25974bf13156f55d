"""Every hook pyramidkd calls, in one place.

Plugins implement these with ``@pyramidkd.engine.hookimpl``. Two families:

* **registration hooks** (``pyramidkd_register_*``) return component classes;
  the host calls each implementation on its own so that every component is
  attributed to the plugin that provides it (duplicate names are an error);
* **lifecycle hooks** (``pyramidkd_run_*``, ``pyramidkd_stage_*``, ...) tell
  loggers and callbacks what the runner is doing. Their return values are ignored.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "pyramidkd"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --- registration -----------------------------------------------------------


@hookspec
def pyramidkd_register_schemes():
    """Return a list of :class:`~pyramidkd.engine.components.Scheme` subclasses.

    A scheme is a planner: given one ``[[stages]]`` entry of a recipe it yields the
    training stages to run (one for ``scratch``, ten for a five-level Pyramid chain).
    Each class sets ``name`` (the value recipes use in ``[stages.scheme] name = ...``)
    and may set ``Params``, an attrs class validating its parameters.
    """


@hookspec
def pyramidkd_register_losses():
    """Return a list of :class:`~pyramidkd.engine.components.Loss` subclasses.

    A loss is an ``nn.Module`` called as ``loss(student, teachers, targets)`` with
    :class:`~pyramidkd.engine.components.ModelOutput` objects; any parameters it
    owns (e.g. a FitNet regressor) are trained with the student.
    """


@hookspec
def pyramidkd_register_datasets():
    """Return a list of :class:`~pyramidkd.engine.components.Dataset` subclasses.

    A dataset's ``load(context)`` returns :class:`~pyramidkd.engine.components.DataSplits`
    with train, validation and test splits (validation is carved from the
    training data: checkpoints are never chosen on test accuracy).
    """


@hookspec
def pyramidkd_register_models():
    """Return a list of :class:`~pyramidkd.engine.components.Model` subclasses.

    A model's ``build(num_classes, input_shape)`` returns an ``nn.Module`` mapping a
    batch of images to logits.
    """


@hookspec
def pyramidkd_register_loggers():
    """Return a list of :class:`~pyramidkd.engine.components.Logger` subclasses.

    A recipe switches loggers on by name (``loggers = ["console", "files"]``); the
    host instantiates each and registers the instance as a plugin for that run, so
    that its lifecycle hook implementations receive the run's events.
    """


@hookspec
def pyramidkd_register_launchers():
    """Return a list of :class:`~pyramidkd.engine.components.Launcher` subclasses.

    A launcher runs the jobs of ``pyramidkd sweep`` (one per cell and seed):
    ``local`` (child processes on this machine), ``ray`` and ``slurm`` are
    built in. A sweep file chooses one with ``[launcher] name = ...``; the rest
    of that table is validated against the launcher's ``Params``.
    """


@hookspec
def pyramidkd_register_commands(commands):
    """Add sub-commands to the ``pyramidkd`` command line.

    Call ``commands.add(name, help=..., arguments=..., run=...)`` once per command:
    ``arguments(parser)`` adds its options to an ``argparse.ArgumentParser`` and
    ``run(args)`` does the work and returns the exit code (0 ok, 1 bad input).
    The built-in commands (``run``, ``report``, ...) register through this hook too.
    Return value ignored.
    """


# --- lifecycle --------------------------------------------------------------


@hookspec
def pyramidkd_run_start(run):
    """Called once before the first stage, after the run directory is prepared.

    ``run`` is the :class:`~pyramidkd.engine.runner.Run` (directory, recipe, device,
    planned stages, ``quiet`` flag; ``completed``: the stages reused from an earlier
    run, ``resume_stage`` and ``resume_history``: the stage continued from its
    ``last`` checkpoint and its earlier epoch records (``EpochRecord``);
    ``results``: the :class:`~pyramidkd.engine.records.StageResult` of each stage so far).
    """


@hookspec
def pyramidkd_run_end(run, summary):
    """Called once after the last stage with the run summary, a
    :class:`~pyramidkd.engine.records.RunSummary` (``summary.to_dict()`` is
    ``summary.json``)."""


@hookspec
def pyramidkd_stage_start(run, stage):
    """Called before a stage trains. ``stage`` is its
    :class:`~pyramidkd.engine.components.StagePlan`."""


@hookspec
def pyramidkd_stage_end(run, stage, result):
    """Called after a stage: its best checkpoint is written and tested. ``result``
    is its :class:`~pyramidkd.engine.records.StageResult` (``result.to_dict()`` goes
    into ``result.json`` and ``summary.json``). Also called for a stage reused from
    an earlier run (its fingerprint unchanged), with ``result.skipped`` true."""


@hookspec
def pyramidkd_batch_end(run, stage, epoch, step, num_steps, loss):
    """Called after every optimisation step. ``loss`` is the (detached) loss tensor:
    call ``.item()`` only when needed, as it synchronises with the device."""


@hookspec
def pyramidkd_epoch_end(run, stage, epoch, metrics):
    """Called after each epoch's validation (and after ``last`` is saved), with that
    epoch's :class:`~pyramidkd.engine.records.EpochRecord`."""


@hookspec
def pyramidkd_metrics(run, stage, record):
    """Called for every metrics record the runner produces: an
    :class:`~pyramidkd.engine.records.EpochRecord` per epoch (``record.kind ==
    "epoch"``) and a :class:`~pyramidkd.engine.records.TestRecord` per stage for the
    test of its best checkpoint (``"test"``). ``record.to_dict()`` is the
    ``metrics.jsonl`` line. Loggers write these out."""
