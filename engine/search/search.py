"""Runs a search: check the search file and its recipe before anything trains,
take the folder (one search per folder, one process at a time), continue the
study stored there, run batches of trials through the launcher until the study
holds ``trials`` trials, re-run the best values on fresh seeds for their test
accuracy, and write the results.
"""

from __future__ import annotations

import difflib
import json
import os
import statistics
import sys
import threading
from typing import Any, ClassVar, TextIO

import attrs

from ..errors import RunDirectoryError, UserError
from ..host import make_plugin_host
from ..records import has_summary, load_summary
from ..runner import prepare
from ..rundir import atomic_write_json
from ..sweeps.folder import LOGS, SCRATCH, SweepFolder
from ..sweeps.jobs import JobOutcome
from ..sweeps.outcome import LaunchOutcome
from ..sweeps.stats import mean_std
from .results import collect_results, write_results
from .spec import SearchPlan, check_search, load_search
from .study import STUDY_FILE, grid_size, import_optuna, next_batch, open_study, storage_url
from .trials import PruningMonitor, TrialWork, launch, make_jobs, seed_scores

DEFINITION_FILE = "search.json"
LOCK_FILE = ".search-lock"
FINAL = "final"


class SearchFolder(SweepFolder):
    """The search folder: ``search.json`` (the search it holds), ``study.db``,
    ``trial-N/seed-S`` and ``final/trial-N/seed-S`` run folders, ``logs/``."""

    noun = "search"
    definition_file = DEFINITION_FILE
    lock_file = LOCK_FILE
    unreadable_fix = f"restore {DEFINITION_FILE}, or choose another --output"
    own_entries = (LOGS, SCRATCH, STUDY_FILE)

    def adopt_search(self, definition: dict[str, Any]) -> None:
        """Take the folder: new, or holding this same search (its study continues);
        another search's folder is refused with a diff."""
        stored = self.stored_definition()
        if stored is None and os.path.isdir(self.path) and not self.empty_enough():
            raise RunDirectoryError("the folder is not empty and holds no search", file=self.path,
                                    fix="choose another --output, or empty that folder")
        if stored is not None and stored != definition:
            diff = "".join(difflib.unified_diff(_lines(stored), _lines(definition), f"stored {DEFINITION_FILE}", "this search", n=1))
            raise RunDirectoryError(f"the folder holds a different search:\n{diff.rstrip()}", file=self.path,
                                    fix="choose another --output: a search's recipe, set values, space, seeds, metric "
                                        "and stage stay fixed once it started (trials, sampler and launcher may change)")
        os.makedirs(self.path, exist_ok=True)
        if stored != definition:
            atomic_write_json(self.file(DEFINITION_FILE), definition)


def _lines(definition: dict[str, Any]) -> list[str]:
    return [line + "\n" for line in json.dumps(definition, indent=1, sort_keys=True).splitlines()]


@attrs.frozen
class SearchSetup:
    """A search file checked and planned: what ``--dry-run`` shows and :func:`run_search` runs."""

    plan: SearchPlan
    folder: SearchFolder
    target: int  # trials the study should hold
    parallel: int  # trials at a time
    storage: str


@attrs.define
class SearchOutcome(LaunchOutcome):
    interrupted_note: ClassVar[str] = ("search interrupted: run the same command again to continue (finished trials are kept, "
                                       "the interrupted ones continue from their runs' last checkpoints)")
    retry_note: ClassVar[str] = "fix the cause and run again with a larger --trials to add trials"

    folder: str
    failed: list[tuple[int, str]] = attrs.field(factory=list)  # (trial, why) of this invocation
    interrupted: bool = False
    results: dict | None = None

    def failure_lines(self) -> list[str]:
        lines = [f"{len(self.failed)} trial(s) failed (they count as trials; see their logs under logs/):"]
        return lines + [f"  trial {number}: {why}" for number, why in self.failed]


def plan_search(path: str, *, output: str | None = None, launcher: str | None = None, trials: int | None = None) -> SearchSetup:
    """Load a search file, check it and its recipe, and plan it in ``output``
    (default ``runs/<search name>``); ``trials`` replaces ``[search] trials``."""
    plan = load_search(path, launcher=launcher, registry=make_plugin_host().registry("launcher"))
    check_search(plan)
    target = trials or plan.section.trials
    if plan.section.sampler == "grid":
        target = min(target, grid_size(plan))
    parallel = plan.section.parallel or _default_parallel(plan)
    folder = SearchFolder(output or os.path.join("runs", plan.name))
    return SearchSetup(plan, folder, target, parallel, storage_url(plan, folder.path))


def _default_parallel(plan: SearchPlan) -> int:
    """As many trials as the local launcher's workers can hold (seeds included); 1 elsewhere."""
    workers = getattr(plan.launcher.params, "workers", None) if plan.launcher else None
    return max(1, (workers or 1) // len(plan.seeds))


def describe(setup: SearchSetup) -> str:
    """What ``--dry-run`` prints."""
    plan, s = setup.plan, setup.plan.section
    launcher = plan.launcher.instantiate().describe() if plan.launcher else "(none)"
    lines = [f"search {plan.name} ({plan.file}): recipe {plan.recipe}, {setup.target} trial(s), {setup.parallel} at a time, "
             f"{len(plan.seeds)} seed(s) each {plan.seeds}",
             f"selects on {s.metric} of stage {plan.stage!r} ({s.direction}; the mean over the seeds), "
             f"sampler {s.sampler}, pruner {s.pruner}",
             f"final: the best values re-run on seeds {s.final_seeds} for their test accuracy" if s.final_seeds
             else "final: none (final_seeds = [])",
             f"launcher {launcher}", f"folder: {setup.folder.path}", f"study: {setup.storage}", "", "space:"]
    lines += [f"  {p.key}: {p.describe()}" for p in plan.space]
    if plan.fixed:
        lines += ["set:"] + [f"  {arg}" for arg in plan.fixed_args()]
    stored = setup.folder.stored_definition()
    if stored is not None and stored != plan.definition():
        lines += ["", "note: the folder holds a different search: choose another --output"]
    return "\n".join(lines)


def run_search(setup: SearchSetup, stream: TextIO | None = None) -> SearchOutcome:
    """Continue (or start) the study until it holds ``setup.target`` trials, then the
    final re-run; the results are written also after failures or Ctrl-C."""
    stream = stream or sys.stderr
    import_optuna()
    outcome = SearchOutcome(setup.folder.path)
    with setup.folder.lock():
        setup.folder.adopt_search(setup.plan.definition())
        study = open_study(setup.plan, setup.storage, setup.target)
        final = None
        try:
            while work := next_batch(study, setup.plan, setup.target, setup.parallel):
                run_batch(study, setup, work, outcome, stream)
            final = run_final(study, setup, stream)
        except KeyboardInterrupt:
            outcome.interrupted = True
        outcome.results = collect_results(study, setup.plan, setup.folder, final)
        write_results(setup.folder.path, outcome.results, study)
    return outcome


def run_batch(study, setup: SearchSetup, work: list[TrialWork], outcome: SearchOutcome, stream: TextIO) -> None:
    """Run the trials of ``work`` together; tell each one's end to the study as it comes.
    A trial whose runs failed is told FAIL only when the batch ends without Ctrl-C:
    an interrupted trial stays RUNNING and continues on the next invocation."""
    plan, folder = setup.plan, setup.folder
    from optuna.trial import TrialState

    guard = threading.Lock()
    jobs = make_jobs(plan, folder, work, lambda args: prepare(plan.recipe_path, args))
    by_key = {f"{item.folder}/seed-{seed}": (item, seed) for item in work for seed in item.seeds}
    for item in work:
        state = "continues (left unfinished by an interrupted search)" if item.resumed else "starts"
        _say(stream, f"trial {item.number} {state}: " + ", ".join(f"{k} = {_short(v)}" for k, v in item.values.items()))

    def on_done(result: JobOutcome) -> None:
        item, seed = by_key[result.key]
        item.outcomes[seed] = result
        _settle(study, setup, item, guard, stream)

    for item in work:
        _settle(study, setup, item, guard, stream)  # its runs finished before (a resumed trial)
    with PruningMonitor(study, folder, plan.stage, work, guard, say=lambda text: _say(stream, text)):
        launch(plan, folder, jobs, on_done)
    for item in work:
        if item.ended is None:
            why = "; ".join(f"seed {seed}: {r.error}" for seed, r in item.outcomes.items() if not r.ok) or "its runs did not end"
            study.tell(item.trial, state=TrialState.FAIL)
            item.ended = "failed"
            outcome.failed.append((item.number, why))
            _say(stream, f"trial {item.number} failed: {why}")


def _settle(study, setup: SearchSetup, item: TrialWork, guard: threading.Lock, stream: TextIO) -> None:
    """Tell the study a trial's score once every seed's run finished well."""
    if len(item.outcomes) < len(item.seeds) or not all(r.ok for r in item.outcomes.values()):
        return
    with guard:
        if item.ended is not None:
            return
        try:
            scores = seed_scores(setup.plan, setup.folder, item, setup.plan.section.metric)
        except UserError as error:
            item.outcomes[item.seeds[0]] = JobOutcome(f"{item.folder}/seed-{item.seeds[0]}", "failed", error.message)
            return
        value = statistics.fmean(scores.values())
        item.trial.set_user_attr("scores", {str(seed): score for seed, score in scores.items()})
        study.tell(item.trial, value)
        item.ended = "complete"
    best = study.best_trial
    _say(stream, f"trial {item.number} complete: {setup.plan.section.metric} {100 * value:.2f} "
                 f"(best so far: trial {best.number}, {100 * best.value:.2f})")


def run_final(study, setup: SearchSetup, stream: TextIO) -> dict | None:
    """The best trial's values re-run on ``final_seeds`` (fresh: never used by the
    search): the test accuracy the search reports. Finished runs are kept."""
    from optuna.trial import TrialState

    plan, folder, seeds = setup.plan, setup.folder, list(setup.plan.section.final_seeds)
    if not seeds or not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    values = {p.key: p.tidy(best.params[p.key]) for p in plan.space}
    item = TrialWork(best, values, f"{FINAL}/trial-{best.number}", seeds)
    jobs = make_jobs(plan, folder, [item], lambda args: prepare(plan.recipe_path, args))
    failed: dict[int, str] = {}
    if jobs:
        _say(stream, f"final: trial {best.number}'s values on fresh seeds {seeds} ({len(jobs)} run(s))")
    launch(plan, folder, jobs, lambda r: None if r.ok else failed.__setitem__(int(r.key.rsplit("seed-", 1)[1]), r.error))
    test, val = {}, {}
    for seed in seeds:
        run = folder.run_folder(item.folder, seed)
        stage = load_summary(run).stage(plan.stage) if has_summary(run) else None
        if stage is not None:
            test[seed], val[seed] = stage.test_acc, stage.best_val_acc
    return {"trial": best.number, "values": values, "seeds": seeds, "folder": item.folder, "stage": plan.stage,
            "test_acc": mean_std([test.get(s) for s in seeds]), "best_val_acc": mean_std([val.get(s) for s in seeds]),
            "failed": {str(seed): why for seed, why in failed.items()}}


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _say(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()
