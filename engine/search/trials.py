"""A batch of trials through a sweep launcher: every trial x seed is a
:class:`~pyramidkd.engine.sweeps.jobs.RunJob` on an ordinary run folder
(``DIR/trial-N/seed-S``), so an interrupted trial continues from its runs' last
checkpoints. While the runs train, :class:`PruningMonitor` reads each epoch's
validation accuracy of the tuned stage from their ``metrics.jsonl`` (as the
sweep's live view does), reports it to the trial and stops a pruned trial's runs
(SIGINT: they save and stop).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import statistics
import threading
from typing import Any, Callable

import attrs

from ..components import LaunchContext
from ..errors import UserError
from ..recipe import format_override
from ..records import EpochRecord, load_summary, read_metrics
from ..rundir import LOCK_FILE
from ..sweeps.folder import SCRATCH, SweepFolder
from ..sweeps.jobs import JobOutcome, RunJob
from ..sweeps.sweep import plan_runs
from ..sweeps.spec import SweepCell, SweepPlan
from .spec import SearchPlan

log = logging.getLogger("pyramidkd.search")


def trial_folder(number: int) -> str:
    return f"trial-{number}"


@attrs.define
class TrialWork:
    """One trial being run: its Optuna trial, its values and its runs' outcomes."""

    trial: Any  # optuna.Trial
    values: dict[str, Any]
    folder: str  # relative to the search folder: "trial-N" (or "final/trial-N")
    seeds: list[int]
    outcomes: dict[int, JobOutcome] = attrs.field(factory=dict)
    reported: set[int] = attrs.field(factory=set)  # epochs already reported
    ended: str | None = None  # "complete", "pruned", "failed" once told
    resumed: bool = False  # left RUNNING by a search that was killed: continues in its own run folders

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def cell(self) -> str:
        return self.folder.replace("/", "-")


def overrides(plan: SearchPlan, values: dict[str, Any], seed: int) -> list[str]:
    return [*plan.fixed_args(), *(format_override(k, v) for k, v in values.items()), f"experiment.seed={seed}"]


def make_jobs(plan: SearchPlan, folder: SweepFolder, work: list[TrialWork], prepared) -> list[RunJob]:
    """The runs of ``work`` that have not finished; finished ones get a "done" outcome.
    ``prepared(overrides)`` plans a recipe (:func:`~pyramidkd.engine.runner.prepare`)."""
    jobs = []
    for item in work:
        cell = SweepCell(item.cell, plan.recipe, plan.recipe_path, {**plan.fixed, **item.values}, item.folder)
        sweep = SweepPlan(plan.name, plan.file, item.seeds, [cell], [])
        for run in plan_runs(sweep, folder, {cell.id: prepared(overrides(plan, item.values, item.seeds[0]))}):
            key = f"{item.folder}/seed-{run.seed}"
            if run.status == "finished":
                item.outcomes[run.seed] = JobOutcome(key, "done")
                continue
            jobs.append(RunJob(key, item.cell, run.seed, plan.recipe_path, tuple(overrides(plan, item.values, run.seed)),
                               run.folder, run.log_file))
    return jobs


def seed_scores(plan: SearchPlan, folder: SweepFolder, item: TrialWork, field: str) -> dict[int, float]:
    """``field`` of the tuned stage in each finished run of ``item`` (by seed)."""
    scores = {}
    for seed in item.seeds:
        stage = load_summary(folder.run_folder(item.folder, seed)).stage(plan.stage)
        if stage is None:
            raise UserError(f"the run of {item.folder}, seed {seed}, has no stage {plan.stage!r}", file=plan.file,
                            key="search.stage", fix="name a stage of the recipe")
        scores[seed] = float(getattr(stage, field))
    return scores


def stage_epochs(run_folder: str, stage: str) -> dict[int, float]:
    """Validation accuracy by epoch of ``stage`` so far, from the run's metrics.jsonl."""
    try:
        records = read_metrics(os.path.join(run_folder, "metrics.jsonl"))
    except OSError:
        return {}
    return {r.epoch: r.val_acc for r in records if isinstance(r, EpochRecord) and r.stage == stage}


def stop_run(run_folder: str) -> bool:
    """SIGINT to the process training in ``run_folder`` (its ``.lock`` names it), when
    it runs on this machine: the run saves its last checkpoint and stops. Runs on
    other machines (Ray, Slurm) cannot be reached and go on to their end."""
    try:
        with open(os.path.join(run_folder, LOCK_FILE), encoding="utf-8") as handle:
            owner = handle.read().split()
    except OSError:
        return False
    if len(owner) != 4 or owner[0] != "pid" or owner[3] != socket.gethostname():
        return False
    try:
        os.kill(int(owner[1]), signal.SIGINT)
    except (ProcessLookupError, PermissionError, ValueError):
        return False
    return True


class PruningMonitor:
    """Reports each trial's per-epoch validation accuracy (the mean over its seeds,
    once every seed reached the epoch) and prunes it when the pruner says so."""

    def __init__(self, study, folder: SweepFolder, stage: str, work: list[TrialWork], guard: threading.Lock,
                 say: Callable[[str], None] = log.info, stop: Callable[[str], bool] = stop_run, interval: float = 1.0):
        self.study, self.folder, self.stage, self.work = study, folder, stage, work
        self.guard, self.say, self.stop, self.interval = guard, say, stop, interval
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="search-pruning", daemon=True)

    def __enter__(self) -> "PruningMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.poll()
            except Exception as error:  # noqa: BLE001 - the search goes on without pruning this round
                log.warning("search: reading the runs' progress failed: %s", error)

    def poll(self) -> list[int]:
        """One look at every running trial; returns the numbers of those pruned now."""
        from optuna.trial import TrialState

        pruned = []
        for item in self.work:
            with self.guard:
                if item.ended is not None:
                    continue
                if not self._report(item) or not item.trial.should_prune():
                    continue
                self.study.tell(item.trial, state=TrialState.PRUNED)
                item.ended = "pruned"
            pruned.append(item.number)
            stopped = sum(self.stop(self.folder.run_folder(item.folder, seed)) for seed in item.seeds)
            self.say(f"trial {item.number} pruned at epoch {max(item.reported)} of stage {self.stage!r} "
                     f"({stopped} run(s) stopped; they saved their last checkpoint)")
        return pruned

    def _report(self, item: TrialWork) -> bool:
        """Report the epochs every seed has reached; whether anything new was reported."""
        by_seed = [stage_epochs(self.folder.run_folder(item.folder, seed), self.stage) for seed in item.seeds]
        common = set.intersection(*(set(epochs) for epochs in by_seed)) if by_seed else set()
        new = sorted(common - item.reported)
        for epoch in new:
            item.trial.report(statistics.fmean(epochs[epoch] for epochs in by_seed), epoch)
            item.reported.add(epoch)
        return bool(new)


def launch(plan: SearchPlan, folder: SweepFolder, jobs: list[RunJob], on_done: Callable[[JobOutcome], None]) -> None:
    """Run ``jobs`` through the search's launcher."""
    if not jobs:
        return
    context = LaunchContext(folder.path, folder.file(SCRATCH), plan.name)
    os.makedirs(context.scratch, exist_ok=True)
    plan.launcher.instantiate().launch(jobs, on_done, context)

