"""What the experiment-tracker loggers (``mlflow``, ``wandb``) share.

:class:`TrackerLogger` turns the lifecycle hooks into a handful of tracker calls
(start the run, start a stage, log an epoch, end a stage, end the run) that each
tracker implements. Every one of those calls goes through :class:`Guard`: a tracker
that is unreachable or raises costs one warning, never the run.

The tracker's run id is kept in the run folder (``trackers.json``), with the last
epoch logged per stage, so that a run continued in its folder (``--resume``, or
the same command again) logs into the same tracker run and adds exactly what the
tracker does not have yet: epochs logged before an interruption are not repeated,
and stages the tracker missed (it was down, or the logger was added later) are
filled in from ``metrics.jsonl`` and the stored results.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
from typing import Any, Callable

import attrs

from pyramidkd.engine import EpochRecord, FieldValueError, Logger, StageResult, hookimpl, install_hint, read_metrics

log = logging.getLogger("pyramidkd")

STATE_FILE = "trackers.json"
ARTEFACT_FILES = ("summary.json", "recipe.toml")
PLOTS_FOLDER = "plots"
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"
SWEEP_FILE = "sweep.json"
# Per-epoch values sent to the tracker (fields of EpochRecord), step = the epoch.
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc", "lr", "epoch_time_s")


# --- installation -------------------------------------------------------------


def install_fix(extra: str) -> str:
    """The command that installs an optional extra: the venv's editable install
    from a checkout, the published extra otherwise."""
    return f"install it: {install_hint(extra)}"


def require_package(module: str, logger: str) -> None:
    """Raise a :class:`FieldValueError` (the recipe's key and the install command
    are added by the validator) when ``module`` cannot be imported."""
    try:
        missing = sys.modules.get(module, ...) is None or importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        raise FieldValueError(f"the {logger} logger needs the {module} package, which is not installed",
                              f"{install_fix(module)}, or remove the {logger} logger from loggers")


def non_empty(instance, attribute, value):
    """attrs validator: an optional text that, when given, is not blank."""
    if value is not None and not value.strip():
        raise FieldValueError("must not be empty", f"leave {attribute.name} out for the default, or give a value")


# --- what is logged ------------------------------------------------------------


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Key paths (``train.optimizer.lr``) to scalar values. Tables of a list are
    named by their ``id`` (stages) or their index; a list of plain values is one
    value (its JSON text)."""
    if isinstance(data, dict):
        items = [(str(key), value) for key, value in data.items()]
    elif isinstance(data, (list, tuple)) and any(isinstance(item, dict) for item in data):
        items = [(str(item.get("id", index)) if isinstance(item, dict) else str(index), item) for index, item in enumerate(data)]
    else:
        if isinstance(data, (list, tuple)):
            data = json.dumps(list(data), default=str)
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def stage_plan_params(stage) -> dict[str, Any]:
    """A stage as planned (defaults filled in): model, loss, training settings."""
    plan = {
        "model": stage.model.as_dict(),
        "loss": stage.loss.as_dict(),
        "train": attrs.asdict(stage.train) if attrs.has(type(stage.train)) else {},
        "select": stage.select,
        "teachers": [getattr(t, "stage_id", None) or getattr(t, "path", "") for t in stage.teachers],
    }
    return flatten(plan)


def epoch_metrics(record: EpochRecord) -> dict[str, float]:
    return {name: float(getattr(record, name)) for name in EPOCH_METRICS
            if isinstance(getattr(record, name), (int, float)) and not isinstance(getattr(record, name), bool)}


def result_metrics(result: StageResult) -> dict[str, float]:
    """A finished stage's figures (its best checkpoint's test, at the best epoch)."""
    return {"test_acc": float(result.test_acc), "test_loss": float(result.test_loss),
            "best_val_acc": float(result.best_val_acc), "best_epoch": float(result.best_epoch)}


def artefacts(folder: str) -> list[str]:
    """The run folder's files sent to the tracker at the end: those that exist."""
    paths = [os.path.join(folder, name) for name in ARTEFACT_FILES]
    plots = os.path.join(folder, PLOTS_FOLDER)
    if os.path.isdir(plots):
        paths += [os.path.join(plots, name) for name in sorted(os.listdir(plots))]
    return [path for path in paths if os.path.isfile(path)]


@attrs.frozen
class Identity:
    """Who a run is: names and tags common to all trackers."""

    experiment: str
    name: str
    folder: str
    seed: int
    git_commit: str | None = None
    sweep: str | None = None  # the sweep's name, when the run is one of a sweep's
    cell: str | None = None  # its cell id
    sweep_folder: str | None = None

    def tags(self) -> dict[str, str]:
        tags = {"seed": str(self.seed), "run_folder": self.folder}
        for key in ("git_commit", "sweep", "cell"):
            if getattr(self, key):
                tags[key] = str(getattr(self, key))
        return tags


def identify(run) -> Identity:
    folder = run.directory.path
    sweep = find_sweep(folder, run.seed)
    name = f"{sweep[1]}/seed-{run.seed}" if sweep else os.path.basename(folder)
    return Identity(run.recipe.experiment.name, name, folder, run.seed, git_commit=_json(os.path.join(folder, MANIFEST_FILE)).get("git_commit"),
                    sweep=sweep[0] if sweep else None, cell=sweep[1] if sweep else None, sweep_folder=sweep[2] if sweep else None)


def find_sweep(folder: str, seed: int) -> tuple[str, str, str] | None:
    """(sweep name, cell id, sweep folder) when ``folder`` is a run of a sweep
    (``SWEEP/<cell folder>/seed-N``, the sweep's ``sweep.json`` names the cells)."""
    above = os.path.dirname(folder)
    for _ in range(4):
        definition = _json(os.path.join(above, SWEEP_FILE))
        cells = definition.get("cells") if isinstance(definition.get("cells"), list) else []
        for cell in (cell for cell in cells if isinstance(cell, dict)):
            expected = os.path.normpath(os.path.join(above, str(cell.get("folder") or ""), f"seed-{seed}"))
            if expected == os.path.normpath(folder):
                return str(definition.get("name", "")), str(cell.get("id")), above
        above = os.path.dirname(above)
    return None


def _json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_atomically(path: str, data: dict) -> None:
    handle, temporary = tempfile.mkstemp(prefix=".trackers-", dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


# --- never fail a run ----------------------------------------------------------


class Guard:
    """Runs tracker calls; the first that raises gives one warning and switches the
    tracker off for the rest of this run (an unreachable server is not asked again)."""

    def __init__(self, logger: str, context: Callable = contextlib.nullcontext):
        self.logger = logger
        self.context = context  # entered around each call (a tracker's request limits)
        self.failed = False

    def call(self, what: str, function: Callable, *args, **kwargs) -> bool:
        if self.failed:
            return False
        try:
            with self.context():
                function(*args, **kwargs)
        except Exception as error:  # any failure of the tracker or its library: the run goes on
            self.failed = True
            text = (str(error).strip().splitlines() or [""])[0]
            text = text if len(text) <= 240 else text[:240] + "…"
            log.warning("%s logger: could not %s (%s: %s); the run goes on without %s. Its results are all in the run "
                        "folder; running the same command again (or with --resume) logs what %s missed.",
                        self.logger, what, type(error).__name__, text, self.logger, self.logger)
            return False
        return True


# --- the hooks, for any tracker ------------------------------------------------


class TrackerLogger(Logger):
    """The lifecycle hooks of a tracker logger. Subclasses implement ``destination``,
    ``open_run``, ``open_stage``, ``log_epoch``, ``close_stage`` and ``close_run``;
    ``self.state`` is this tracker's entry of ``trackers.json`` (``run_id``,
    ``stages``: stage id -> ``{"run_id", "epoch", "done"}``)."""

    def __init__(self, params=None):
        super().__init__(params)
        self.guard = Guard(self.name, self.call_context)
        self.state: dict[str, Any] = {}
        self.folder = ""

    # what a tracker implements
    def call_context(self):
        return contextlib.nullcontext()

    def destination(self, run, identity: Identity) -> dict:
        raise NotImplementedError

    def open_run(self, run, identity: Identity) -> None:
        raise NotImplementedError

    def open_stage(self, run, stage_id: str, plan: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_epoch(self, stage_id: str, record: EpochRecord) -> None:
        raise NotImplementedError

    def close_stage(self, stage_id: str, result: StageResult) -> None:
        raise NotImplementedError

    def close_run(self, run, files: list[str]) -> None:
        raise NotImplementedError

    # the state in the run folder
    def save_state(self) -> None:
        path = os.path.join(self.folder, STATE_FILE)
        stored = _json(path)
        stored[self.name] = self.state
        try:
            write_json_atomically(path, stored)
        except OSError as error:  # the run's own files matter more: note it and go on
            log.warning("%s logger: cannot write %s (%s)", self.name, path, error)

    def stage_state(self, stage_id: str) -> dict[str, Any]:
        return self.state.setdefault("stages", {}).setdefault(stage_id, {"run_id": None, "epoch": 0, "done": False})

    # the hooks
    @hookimpl
    def pyramidkd_run_start(self, run):
        if not run.world.is_main:  # the engine calls loggers on rank 0 only; never open a second tracker run
            self.guard.failed = True
            return
        self.folder = run.directory.path
        identity = identify(run)
        destination = self.destination(run, identity)
        stored = _json(os.path.join(self.folder, STATE_FILE)).get(self.name)
        continuing = bool(run.completed or run.resume_stage)
        if continuing and isinstance(stored, dict) and stored.get("destination") == destination:
            self.state = stored
        else:  # a new run (or a new tracker): a new tracker run
            self.state = {"destination": destination, "run_id": None, "stages": {}}
        if self.guard.call("start its run", self.open_run, run, identity):
            self.save_state()

    @hookimpl
    def pyramidkd_stage_start(self, run, stage):
        if stage.id != run.resume_stage:  # trained from the start: a fresh stage in the tracker
            self.state.setdefault("stages", {}).pop(stage.id, None)
        if self.guard.call(f"start stage {stage.id!r}", self.open_stage, run, stage.id, stage_plan_params(stage)):
            self.save_state()
        if stage.id == run.resume_stage:
            for record in run.resume_history:
                self.epoch(stage.id, record)

    @hookimpl
    def pyramidkd_metrics(self, run, stage, record):
        stage_id = record.stage or getattr(stage, "id", None)
        if isinstance(record, EpochRecord) and stage_id:
            self.epoch(stage_id, record)

    def epoch(self, stage_id: str, record: EpochRecord) -> None:
        state = self.stage_state(stage_id)
        if record.epoch <= state["epoch"]:  # the tracker has it already (a resumed stage)
            return
        if self.guard.call(f"log epoch {record.epoch} of stage {stage_id!r}", self.log_epoch, stage_id, record):
            state["epoch"] = record.epoch
            self.save_state()

    @hookimpl
    def pyramidkd_stage_end(self, run, stage, result):
        state = self.stage_state(stage.id)
        if result.skipped:
            if state["done"]:
                return
            # reused from an earlier run the tracker did not see (whole): fill it in from the run folder
            if not self.guard.call(f"start stage {stage.id!r}", self.open_stage, run, stage.id, stage_plan_params(stage)):
                return
            path = os.path.join(self.folder, METRICS_FILE)
            for record in read_metrics(path) if os.path.exists(path) else []:
                if isinstance(record, EpochRecord) and record.stage == stage.id:
                    self.epoch(stage.id, record)
        if self.guard.call(f"end stage {stage.id!r}", self.close_stage, stage.id, result):
            state["done"] = True
            self.save_state()

    @hookimpl
    def pyramidkd_run_end(self, run, summary):
        if self.guard.call("end its run", self.close_run, run, artefacts(self.folder)):
            self.state["finished"] = True
            self.save_state()
