"""``wandb``: the run in Weights & Biases (optional extra ``pyramidkd[wandb]``).

    loggers = ["console", "files", { name = "wandb", project = "kd", entity = "my-team" }]
    loggers = ["console", "files", { name = "wandb", mode = "offline" }]

One W&B run per pyramidkd run. Its config is the resolved recipe (key paths:
``train.optimizer.lr``, ``stages.student.loss.temperature``) plus each stage as
planned (``plan.<stage>.loss.temperature``, defaults included) and ``pyramidkd.seed``,
``pyramidkd.git_commit``, ``pyramidkd.run_folder`` (and ``pyramidkd.sweep``,
``pyramidkd.cell``). Per epoch it logs ``<stage>/train_loss``, ``<stage>/train_acc``,
``<stage>/val_loss``, ``<stage>/val_acc``, ``<stage>/best_val_acc``, ``<stage>/lr``
and ``<stage>/epoch_time_s`` against ``<stage>/epoch``; the summary gets each stage's
``<stage>/test_acc``, ``test_loss``, ``best_val_acc`` and ``best_epoch``. At the end the
run folder's ``summary.json``, ``recipe.toml`` and ``plots/`` are saved to the run.
Tags: ``seed-N``, ``git:<commit>`` and, for a run of a sweep, ``sweep:<name>`` and
``cell:<id>``; a sweep's runs are grouped by cell (``<sweep>/<cell>``), its seeds
the runs of a group.

W&B's local files go to ``<run folder>/wandb/``; in ``mode = "offline"`` nothing
leaves the machine: upload later with ``wandb sync <run folder>/wandb/offline-run-*``.
An unreachable server costs one warning; the run goes on.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from pyramidkd.engine import EpochRecord, FieldValueError, StageResult, hookimpl, positive

from .tracking import Identity, TrackerLogger, epoch_metrics, flatten, non_empty, require_package, result_metrics

MODES = ("online", "offline", "disabled")
MAX_TAG = 64  # W&B's limit on a tag's length
_open_runs: dict[str, Any] = {}  # run id -> the W&B run this process has open


def _mode(instance, attribute, value):
    if value is not None and value not in MODES:
        raise FieldValueError(f"must be one of {', '.join(repr(mode) for mode in MODES)}, got {value!r}",
                              'use mode = "online" (the W&B server), "offline" (files for `wandb sync`) or "disabled"')


@attrs.define
class WandbParams:
    project: str | None = attrs.field(default=None, validator=non_empty, metadata={
        "help": "W&B project; default: the recipe's experiment name"})
    entity: str | None = attrs.field(default=None, validator=non_empty, metadata={
        "help": "W&B team or user; default: your default entity"})
    group: str | None = attrs.field(default=None, validator=non_empty, metadata={
        "help": "W&B group; default: <sweep>/<cell> for a run of a sweep (its seeds grouped), none otherwise"})
    mode: str | None = attrs.field(default=None, validator=_mode, metadata={
        "help": "online, offline (files for `wandb sync`) or disabled; default: WANDB_MODE, else online"})
    timeout_s: float = attrs.field(default=60.0, validator=positive, metadata={
        "help": "seconds to wait for the W&B server when the run starts before the logger gives up for this run"})

    def __attrs_post_init__(self):
        require_package("wandb", "wandb")  # checked while the recipe is validated


def tags(identity: Identity) -> list[str]:
    values = [f"seed-{identity.seed}"]
    values += [f"git:{identity.git_commit[:12]}"] if identity.git_commit else []
    values += [f"sweep:{identity.sweep}", f"cell:{identity.cell}"] if identity.sweep else []
    return [tag[:MAX_TAG] for tag in values]


class WandbLogger(TrackerLogger):
    """The run in Weights & Biases, one W&B run (optional extra ``wandb``)."""

    name = "wandb"
    Params = WandbParams
    wandb_run: Any = None  # the W&B run while it is open (open_run)

    def destination(self, run, identity: Identity) -> dict:
        return {"project": self.params.project or identity.experiment, "entity": self.params.entity}

    def open_run(self, run, identity: Identity) -> None:
        import wandb

        stale = _open_runs.pop(self.state.get("run_id") or "", None)
        if stale is not None:  # the same run stopped early in this process (a notebook): close it first
            stale.finish(exit_code=1)
        config = {**flatten(run.recipe.data),
                  **{f"pyramidkd.{key}": value for key, value in identity.tags().items()}}
        group = self.params.group or (f"{identity.sweep}/{identity.cell}" if identity.sweep else None)
        settings = wandb.Settings(init_timeout=self.params.timeout_s, silent=run.quiet, console="off")
        self.wandb_run = wandb.init(
            project=self.state["destination"]["project"], entity=self.params.entity, group=group, name=identity.name,
            id=self.state.get("run_id"), resume="allow", dir=identity.folder, mode=self.params.mode, config=config,
            tags=tags(identity), reinit="create_new", settings=settings, allow_val_change=True)
        if self.wandb_run.id != self.state.get("run_id"):
            self.state.update(run_id=self.wandb_run.id, stages={})
        _open_runs[self.wandb_run.id] = self.wandb_run

    def open_stage(self, run, stage_id: str, plan: dict[str, Any]) -> None:
        self.stage_state(stage_id)
        self.wandb_run.define_metric(f"{stage_id}/*", step_metric=f"{stage_id}/epoch")
        self.wandb_run.config.update({f"plan.{stage_id}.{key}": value for key, value in plan.items()}, allow_val_change=True)

    def log_epoch(self, stage_id: str, record: EpochRecord) -> None:
        values = {f"{stage_id}/{key}": value for key, value in epoch_metrics(record).items()}
        self.wandb_run.log({f"{stage_id}/epoch": record.epoch, **values})

    def close_stage(self, stage_id: str, result: StageResult) -> None:
        self.wandb_run.summary.update({f"{stage_id}/{key}": value for key, value in result_metrics(result).items()})

    def close_run(self, run, files: list[str]) -> None:
        for path in files:
            self.wandb_run.save(path, base_path=self.folder, policy="now")
        self.wandb_run.finish()
        _open_runs.pop(self.wandb_run.id, None)
        self.wandb_run = None


@hookimpl
def pyramidkd_register_loggers():
    return [WandbLogger]
