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


# --- lifecycle --------------------------------------------------------------


@hookspec
def pyramidkd_run_start(run):
    """Called once before the first stage, after the run directory is prepared.

    ``run`` is the :class:`~pyramidkd.engine.runner.Run` (directory, recipe, device,
    planned stages, ``quiet`` flag).
    """


@hookspec
def pyramidkd_run_end(run, summary):
    """Called once after the last stage with the run summary (the dict written to
    ``summary.json``)."""


@hookspec
def pyramidkd_stage_start(run, stage):
    """Called before a stage trains. ``stage`` is its
    :class:`~pyramidkd.engine.components.StagePlan`."""


@hookspec
def pyramidkd_stage_end(run, stage, result):
    """Called after a stage: its best checkpoint is written and tested. ``result``
    is the dict that goes into ``summary.json`` for that stage (also called for a
    stage skipped because its outputs already exist, with ``result["skipped"]``)."""


@hookspec
def pyramidkd_batch_end(run, stage, epoch, step, num_steps, loss):
    """Called after every optimisation step. ``loss`` is the (detached) loss tensor:
    call ``.item()`` only when needed, as it synchronises with the device."""


@hookspec
def pyramidkd_epoch_end(run, stage, epoch, metrics):
    """Called after each epoch's validation, with that epoch's metrics dict."""


@hookspec
def pyramidkd_metrics(run, stage, record):
    """Called for every metrics record the runner produces: one per epoch
    (``record["kind"] == "epoch"``) and one per stage for the test of its best
    checkpoint (``"test"``). Loggers write these out."""
