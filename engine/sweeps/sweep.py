"""Runs a sweep: validate every cell before anything trains, take the folder
(one sweep per folder, one process at a time), skip the runs that finished
earlier, hand the rest to the launcher, record each outcome as it comes, then
aggregate the results.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any, ClassVar, Sequence, TextIO

import attrs

from ..components import LaunchContext
from ..errors import RecipeError, UserError, did_you_mean
from ..formatting import format_table
from ..host import make_plugin_host
from ..recipe import dump_toml, load_recipe
from ..records import load_summary
from ..rundir import RECIPE_FILE
from ..runner import PreparedRun, dataset_context, prepare
from ..training.fingerprint import Fingerprints
from .folder import SCRATCH, SweepFolder, run_key
from .jobs import JobOutcome, RunJob
from .outcome import LaunchOutcome
from .progress import LiveView, TrackedRun
from .results import collect_results, write_results
from .spec import SweepCell, SweepPlan, comparable, load_sweep


@attrs.frozen
class PlannedRun:
    """One cell x seed, with where it lives and whether it finished earlier."""

    cell: SweepCell
    seed: int
    folder: str
    log_file: str
    epochs: int  # planned, over all its stages
    status: str  # "finished" (an earlier sweep completed it), "partial" (it started), "new"

    @property
    def key(self) -> str:
        return run_key(self.cell.id, self.seed)

    def overrides(self) -> list[str]:
        return [*self.cell.override_args(), f"experiment.seed={self.seed}"]


@attrs.define
class SweepOutcome(LaunchOutcome):
    interrupted_note: ClassVar[str] = ("sweep interrupted: run the same command again to continue (finished runs are kept, "
                                       "interrupted ones continue from their last checkpoint)")
    retry_note: ClassVar[str] = "fix the cause and run the same command again: finished runs are kept"

    folder: str
    runs: list[PlannedRun]
    failed: list[tuple[PlannedRun, dict[str, Any]]] = attrs.field(factory=list)
    interrupted: bool = False
    results: dict | None = None  # what finished, aggregated (:func:`finish`)

    def failure_lines(self) -> list[str]:
        lines = [f"{len(self.failed)} run(s) failed:"]
        return lines + [f"  {run.key}: {record['error']}\n    folder: {run.folder}\n    log: {run.log_file}"
                        for run, record in self.failed]


@attrs.frozen
class SweepSetup:
    """A sweep file checked and planned: what ``--dry-run`` shows and :func:`run_sweep` runs."""

    plan: SweepPlan
    folder: SweepFolder
    runs: list[PlannedRun]
    max_epochs: int | None = None


def check_cells(plan: SweepPlan, max_epochs: int | None = None) -> dict[str, PreparedRun]:
    """Validate and plan every cell's recipe with its values, before anything runs."""
    prepared = {}
    for cell in plan.cells:
        try:
            checked = prepare(cell.recipe_path, [*cell.override_args(), f"experiment.seed={plan.seeds[0]}"],
                              max_epochs=max_epochs)
            checked.dataset.instantiate().check(dataset_context(checked.recipe))  # its files are there
            prepared[cell.id] = checked
        except UserError as error:
            origin = f"cell {cell.id!r} of {plan.file} ([sweep] recipe {cell.recipe!r}"
            origin += f" with {', '.join(cell.override_args())})" if cell.overrides else ")"
            error.message = f"{origin}: {error.message}"  # the same error (type, file, key, fix), its cell named
            error.args = (error.message,)
            raise
    _check_baseline_stages(plan, prepared)
    return prepared


def _check_baseline_stages(plan: SweepPlan, prepared: dict[str, PreparedRun]) -> None:
    """A baseline's ``stage`` must be a stage its cell plans (a typo would compare nothing)."""
    for baseline in plan.baselines:
        if baseline.stage is None:
            continue
        cells = [baseline.cell] if baseline.cell else [cell.id for cell in plan.cells]
        known = list(dict.fromkeys(stage.id for cell in cells for stage in prepared[cell].stages))
        if baseline.stage not in known:
            hint = did_you_mean(baseline.stage, known)
            raise RecipeError(f"the baseline stage {baseline.stage!r} is not a stage of {', '.join(cells)}; stages: {', '.join(known)}",
                              file=plan.file, key="sweep.baseline", fix=f"{hint}name one of the stages listed")


def plan_runs(plan: SweepPlan, folder: SweepFolder, prepared: dict[str, PreparedRun]) -> list[PlannedRun]:
    runs = []
    for cell in plan.cells:
        cell_plan = prepared[cell.id]
        epochs = sum(stage.train.epochs for stage in cell_plan.stages)
        for seed in plan.seeds:
            run_folder = folder.run_folder(cell.folder, seed)
            draft = PlannedRun(cell, seed, run_folder, folder.log_file(cell.id, seed), epochs, "new")
            runs.append(attrs.evolve(draft, status=_status(draft, cell_plan)))
    return runs


def _status(run: PlannedRun, cell_plan: PreparedRun) -> str:
    """"finished" only when the folder's recipe and every stage's fingerprint match
    what this sweep would run: a changed recipe file or checkpoint runs again."""
    recipe = os.path.join(run.folder, RECIPE_FILE)
    if not os.path.exists(recipe):
        return "new"
    try:
        with open(recipe, encoding="utf-8") as handle:
            stored = handle.read()
        summary = load_summary(run.folder)
    except (OSError, UserError):  # no summary yet, or a damaged one: the run continues
        return "partial"
    if stored != dump_toml(load_recipe(run.cell.recipe_path, run.overrides()).data):
        return "partial"
    expected = Fingerprints(cell_plan.stages, cell_plan.dataset, run.seed).by_stage
    found = {stage.stage: stage.fingerprint for stage in summary.stages}
    return "finished" if found == expected else "partial"


def describe(setup: SweepSetup) -> str:
    """What ``--dry-run`` prints: the cells, the runs and where they go."""
    plan, runs, folder = setup.plan, setup.runs, setup.folder
    launcher = plan.launcher.instantiate().describe() if plan.launcher else "(none)"
    head = (f"sweep {plan.name} ({plan.file}): {len(plan.cells)} cell(s) x {len(plan.seeds)} seed(s) = {len(runs)} run(s); "
            f"launcher {launcher}\nfolder: {folder.path}")
    cells = format_table([{
        "cell": cell.id, "recipe": cell.recipe,
        "overrides": " ".join(cell.override_args()) or "-",
        "epochs/run": str(next(r.epochs for r in runs if r.cell.id == cell.id)),
    } for cell in plan.cells], right=("epochs/run",))
    table = format_table([{"run": run.key, "status": run.status, "folder": os.path.relpath(run.folder, folder.path)}
                          for run in runs])
    lines = [head, "", cells, "", table]
    if plan.baselines:
        lines += ["", "compared with (paired by seed): " + ", ".join(b.label for b in plan.baselines)]
    stored = folder.stored_definition()
    if stored is not None and comparable(stored) != comparable(plan.definition()):
        lines += ["", "note: the folder holds a different sweep: running it needs --force"]
    return "\n".join(lines)


def execute(plan: SweepPlan, folder: SweepFolder, runs: list[PlannedRun], *, force: bool = False,
            max_epochs: int | None = None, seeds_only: bool = False, stream: TextIO | None = None) -> SweepOutcome:
    """Run every run that has not finished, through ``plan.launcher``."""
    stream = stream or sys.stderr
    outcome = SweepOutcome(folder.path, runs)
    with folder.lock():
        folder.adopt(plan.definition(), comparable, force=force, seeds_only=seeds_only)
        pending = [run for run in runs if run.status != "finished"]
        state = folder.read_state()
        for run in runs:  # a run launched again starts with a clean record
            if run.status == "finished":
                state[run.key] = {**state.get(run.key, {}), "status": "done", "error": None}
            else:
                state.pop(run.key, None)
        folder.write_state(state)
        tracked = [TrackedRun(run.key, run.folder, run.epochs, "finished-before" if run.status == "finished" else "waiting")
                   for run in runs]
        by_key = {run.key: run for run in pending}
        skipped = len(runs) - len(pending)
        if skipped:
            print(f"{skipped} of {len(runs)} run(s) finished earlier: kept", file=stream)
        if not pending:
            return outcome
        jobs = [RunJob(run.key, run.cell.id, run.seed, run.cell.recipe_path, tuple(run.overrides()), run.folder, run.log_file,
                       max_epochs=max_epochs, force=force) for run in pending]
        launcher = plan.launcher.instantiate()
        context = LaunchContext(folder.path, folder.file(SCRATCH), plan.name)
        os.makedirs(context.scratch, exist_ok=True)
        with LiveView(plan.name, tracked, stream) as view:
            view.say(f"launching {len(jobs)} run(s): {launcher.describe()}")

            def on_done(result: JobOutcome) -> None:
                run = by_key[result.key]
                record = {"status": result.status, "error": result.error, "time_s": result.time_s,
                          "log": os.path.relpath(run.log_file, folder.path)}
                state[result.key] = record
                folder.write_state(state)
                if result.ok:
                    view.mark(result.key, "done", None)
                else:
                    outcome.failed.append((run, record))
                    view.mark(result.key, "failed", f"run {result.key} failed: {result.error} (log: {run.log_file})")

            try:
                launcher.launch(jobs, on_done, context)
            except KeyboardInterrupt:
                outcome.interrupted = True
    return outcome


def finish(outcome: SweepOutcome) -> SweepOutcome:
    """Aggregate what finished into ``results.json``, ``.csv`` and ``.md`` (also after
    failures or Ctrl-C: the results as they stand); ``outcome.results`` holds them."""
    outcome.results = collect_results(outcome.folder)
    write_results(outcome.folder, outcome.results)
    return outcome


def plan_sweep(path: str, *, output: str | None = None, launcher: str | None = None,
               max_epochs: int | None = None) -> SweepSetup:
    """Load a sweep file, check every cell, and plan its runs in ``output``
    (default ``runs/<sweep name>``)."""
    plan = load_sweep(path, launcher=launcher, registry=make_plugin_host().registry("launcher"))
    prepared = check_cells(plan, max_epochs)
    folder = SweepFolder(output or os.path.join("runs", plan.name))
    return SweepSetup(plan, folder, plan_runs(plan, folder, prepared), max_epochs)


def run_sweep(setup: SweepSetup, *, force: bool = False) -> SweepOutcome:
    """Run what has not finished, then write the results (:func:`finish`)."""
    return finish(execute(setup.plan, setup.folder, setup.runs, force=force, max_epochs=setup.max_epochs))


def validate_sweep(path: str, overrides: Sequence[str] = ()) -> str:
    """``pyramidkd validate SWEEP.toml``: the sweep file and every cell's recipe; the text to print."""
    if overrides:
        raise UserError("--set applies to recipes, not to sweep files", file=path,
                        fix="put the value in the sweep file's [sweep] set table (every cell) or [grid] (an axis)")
    plan = load_sweep(path, registry=make_plugin_host().registry("launcher"))
    prepared = check_cells(plan)
    lines = [f"{path}: ok — sweep {plan.name}: {len(plan.cells)} cell(s) x {len(plan.seeds)} seed(s), "
             f"launcher {plan.launcher.instantiate().describe()}"]
    for cell in plan.cells:
        stages = prepared[cell.id].stages
        lines.append(f"  {cell.id}: {len(stages)} stage(s), {sum(s.train.epochs for s in stages)} epochs")
    return "\n".join(lines)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM stops a sweep as Ctrl-C does: its runs save, the folder stays consistent."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
