"""Every hook pyramidkd calls, in one place.

Plugins implement these with ``@pyramidkd.engine.hookimpl``. Two families:

* **registration hooks** (``pyramidkd_register_*``) return component classes;
  the host calls each implementation on its own so that every component is
  attributed to the plugin that provides it (duplicate names are an error);
* **lifecycle hooks** (``pyramidkd_run_*``, ``pyramidkd_stage_*``, ...) tell
  loggers and callbacks what the runner is doing. Their return values are ignored.

The registration hooks run once, when the plugin host is built (before the recipe is
planned). The lifecycle hooks run in this order (:mod:`~pyramidkd.engine.runner`
and :mod:`~pyramidkd.engine.training.loop`), on rank 0 only under torchrun::

    pyramidkd_run_start(run)
    for stage in run.stages:
        if stage.id in run.completed:                  # reused: unchanged since an earlier run
            pyramidkd_stage_end(run, stage, result)    # result.skipped is True; no other hook
            continue
        pyramidkd_stage_start(run, stage)              # after the stage's models are built (and restored on resume)
        for epoch in remaining_epochs:                 # from the resumed epoch on --resume
            for step in remaining_steps:               # from the step after the saved one
                pyramidkd_batch_end(run, stage, epoch, step, num_steps, loss)   # every batch, skipped ones too
            # validation, then `last` is saved
            pyramidkd_epoch_end(run, stage, epoch, metrics)   # metrics: the EpochRecord
            pyramidkd_metrics(run, stage, record)             # the same EpochRecord
        # the best checkpoint is tested
        pyramidkd_metrics(run, stage, record)          # the TestRecord
        pyramidkd_stage_end(run, stage, result)        # result: the StageResult, result.json written
    pyramidkd_run_end(run, summary)                    # summary.json written

A run stopped early (Ctrl-C, a non-finite loss, an error) ends after the last hook
called: no ``stage_end`` or ``run_end`` follows. The argument types below are
annotations only (imported for type checkers, never at run time).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable, Protocol

import pluggy

if TYPE_CHECKING:
    import torch

    from .components import Dataset, Launcher, Logger, Loss, Model, Scheme, StagePlan
    from .lifecycle import Run
    from .records import EpochRecord, RunSummary, StageResult, TestRecord

PROJECT_NAME = "pyramidkd"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class CommandAdder(Protocol):
    """What ``pyramidkd_register_commands`` receives (the command-line registry,
    :class:`pyramidkd.engine.commands.registry.Commands`, which the runtime does
    not import)."""

    def add(self, name: str, *, help: str, run: Callable[[argparse.Namespace], int | None],
            arguments: Callable[[argparse.ArgumentParser], None] | None = None, description: str | None = None) -> None:
        ...


# --- registration -----------------------------------------------------------


@hookspec
def pyramidkd_register_schemes() -> list[type[Scheme]]:
    """Return a list of :class:`~pyramidkd.engine.components.Scheme` subclasses.

    A scheme is a planner: given one ``[[stages]]`` entry of a recipe it yields the
    training stages to run (one for ``scratch``, ten for a five-level Pyramid chain).
    Each class sets ``name`` (the value recipes use in ``[stages.scheme] name = ...``)
    and may set ``Params``, an attrs class validating its parameters.
    """


@hookspec
def pyramidkd_register_losses() -> list[type[Loss]]:
    """Return a list of :class:`~pyramidkd.engine.components.Loss` subclasses.

    A loss is an ``nn.Module`` called as ``loss(student, teachers, targets)`` with
    :class:`~pyramidkd.engine.components.ModelOutput` objects; any parameters it
    owns (e.g. a FitNet regressor) are trained with the student.
    """


@hookspec
def pyramidkd_register_datasets() -> list[type[Dataset]]:
    """Return a list of :class:`~pyramidkd.engine.components.Dataset` subclasses.

    A dataset's ``load(context)`` returns :class:`~pyramidkd.engine.components.DataSplits`
    with train, validation and test splits (validation is carved from the
    training data: checkpoints are never chosen on test accuracy).
    """


@hookspec
def pyramidkd_register_models() -> list[type[Model]]:
    """Return a list of :class:`~pyramidkd.engine.components.Model` subclasses.

    A model's ``build(num_classes, input_shape)`` returns an ``nn.Module`` mapping a
    batch of images to logits.
    """


@hookspec
def pyramidkd_register_loggers() -> list[type[Logger]]:
    """Return a list of :class:`~pyramidkd.engine.components.Logger` subclasses.

    A recipe switches loggers on by name (``loggers = ["console", "files"]``); the
    host instantiates each and registers the instance as a plugin for that run, so
    that its lifecycle hook implementations receive the run's events.
    """


@hookspec
def pyramidkd_register_launchers() -> list[type[Launcher]]:
    """Return a list of :class:`~pyramidkd.engine.components.Launcher` subclasses.

    A launcher runs the jobs of ``pyramidkd sweep`` (one per cell and seed):
    ``local`` (child processes on this machine), ``ray`` and ``slurm`` are
    built in. A sweep file chooses one with ``[launcher] name = ...``; the rest
    of that table is validated against the launcher's ``Params``.
    """


@hookspec
def pyramidkd_register_commands(commands: CommandAdder) -> None:
    """Add sub-commands to the ``pyramidkd`` command line.

    Call ``commands.add(name, help=..., arguments=..., run=...)`` once per command:
    ``arguments(parser)`` adds its options to an ``argparse.ArgumentParser`` and
    ``run(args)`` does the work and returns the exit code (0 ok, 1 bad input).
    The built-in commands (``run``, ``report``, ...) register through this hook too.
    Return value ignored.
    """


# --- lifecycle --------------------------------------------------------------


@hookspec
def pyramidkd_run_start(run: Run) -> None:
    """Called once before the first stage, after the run directory is prepared.

    ``run`` is the :class:`~pyramidkd.engine.lifecycle.Run` (directory, recipe, device,
    planned stages, ``quiet`` flag; ``completed``: the stages reused from an earlier
    run, ``resume_stage`` and ``resume_history``: the stage continued from its
    ``last`` checkpoint and its earlier epoch records (``EpochRecord``);
    ``results``: the :class:`~pyramidkd.engine.records.StageResult` of each stage so far).
    """


@hookspec
def pyramidkd_run_end(run: Run, summary: RunSummary) -> None:
    """Called once after the last stage with the run summary, a
    :class:`~pyramidkd.engine.records.RunSummary` (``summary.to_dict()`` is
    ``summary.json``)."""


@hookspec
def pyramidkd_stage_start(run: Run, stage: StagePlan) -> None:
    """Called before a stage trains. ``stage`` is its
    :class:`~pyramidkd.engine.components.StagePlan`."""


@hookspec
def pyramidkd_stage_end(run: Run, stage: StagePlan, result: StageResult) -> None:
    """Called after a stage: its best checkpoint is written and tested. ``result``
    is its :class:`~pyramidkd.engine.records.StageResult` (``result.to_dict()`` goes
    into ``result.json`` and ``summary.json``). Also called for a stage reused from
    an earlier run (its fingerprint unchanged), with ``result.skipped`` true."""


@hookspec
def pyramidkd_batch_end(run: Run, stage: StagePlan, epoch: int, step: int, num_steps: int, loss: torch.Tensor) -> None:
    """Called after every training batch (one optimisation step; a batch skipped for a
    non-finite loss too). ``epoch`` counts from 1, ``step`` from 1 to ``num_steps``
    (the steps of an epoch). ``loss`` is the (detached) loss tensor: call ``.item()``
    only when needed, as it synchronises with the device."""


@hookspec
def pyramidkd_epoch_end(run: Run, stage: StagePlan, epoch: int, metrics: EpochRecord) -> None:
    """Called after each epoch's validation (and after ``last`` is saved), with that
    epoch's :class:`~pyramidkd.engine.records.EpochRecord`."""


@hookspec
def pyramidkd_metrics(run: Run, stage: StagePlan, record: EpochRecord | TestRecord) -> None:
    """Called for every metrics record the runner produces: an
    :class:`~pyramidkd.engine.records.EpochRecord` per epoch (``record.kind ==
    "epoch"``) and a :class:`~pyramidkd.engine.records.TestRecord` per stage for the
    test of its best checkpoint (``"test"``). ``record.to_dict()`` is the
    ``metrics.jsonl`` line. Loggers write these out."""
