"""``mlflow``: the run in MLflow (optional extra ``pyramidkd[mlflow]``).

    loggers = ["console", "files", "mlflow"]
    loggers = ["console", "files", { name = "mlflow", tracking_uri = "http://mlflow.example:5000", experiment = "kd" }]

One MLflow run per pyramidkd run, with a nested run per stage. The parent run has
the resolved recipe as params (key paths: ``train.optimizer.lr``,
``stages.student.loss.temperature``), each stage's ``<stage>/test_acc``,
``<stage>/best_val_acc`` … as metrics, the run folder's ``summary.json``,
``recipe.toml`` and ``plots/`` as artefacts at the end, and the tags ``seed``,
``git_commit`` (also ``mlflow.source.git.commit``), ``run_folder`` and, for a run
of a sweep, ``sweep`` and ``cell``. A stage's run has the stage as planned (model,
loss and training settings, defaults included) as params and, per epoch
(``step`` = the epoch), ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``,
``best_val_acc``, ``lr`` and ``epoch_time_s``; then ``test_acc`` and ``test_loss``
of its best checkpoint at the best epoch.

Without ``tracking_uri`` (and no ``MLFLOW_TRACKING_URI``), runs go to a SQLite
file beside the run folder (beside the sweep folder for a sweep's runs), e.g.
``runs/mlflow.db``, with artefacts in ``runs/mlartifacts``; look at them with
``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``. A tracking server
that cannot be reached costs one warning; the run goes on.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import pathlib
import re
import time
from typing import Any

import attrs

from pyramidkd.engine import EpochRecord, StageResult, hookimpl, positive

from .tracking import Identity, TrackerLogger, epoch_metrics, flatten, non_empty, require_package, result_metrics

MAX_PARAM_VALUE = 6000  # MLflow's limits (mlflow.utils.validation)
MAX_KEY = 250
PARAMS_PER_BATCH = 100
SQLITE = "sqlite:///"
DATABASE_FILE = "mlflow.db"
ARTEFACT_FOLDER = "mlartifacts"
RETRIES = 1  # one retry per request: an unreachable server is given up within about twice timeout_s
_unfinished: dict[str, "MlflowLogger"] = {}  # parent run id -> the logger that has it open in this process


@attrs.define
class MlflowParams:
    tracking_uri: str | None = attrs.field(default=None, validator=non_empty, metadata={
        "help": "where runs go: a server (http://host:5000) or a store (sqlite:///path/mlflow.db); default: "
                "MLFLOW_TRACKING_URI, else sqlite:///<folder holding the run or sweep folder>/mlflow.db"})
    experiment: str | None = attrs.field(default=None, validator=non_empty, metadata={
        "help": "MLflow experiment name; default: the recipe's experiment name"})
    timeout_s: float = attrs.field(default=10.0, validator=positive, metadata={
        "help": "seconds one request to a tracking server may take before the logger gives up for this run"})

    def __attrs_post_init__(self):
        require_package("mlflow", "mlflow")  # checked while the recipe is validated


def default_tracking_uri(identity: Identity) -> str:
    parent = os.path.dirname(identity.sweep_folder or identity.folder)
    return SQLITE + os.path.join(parent, DATABASE_FILE)


def _key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)[:MAX_KEY]


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_VALUE]


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialise the creation of a SQLite store (its tables, the experiment): the
    runs of a local sweep start at the same moment."""
    if not uri.startswith(SQLITE):
        yield
        return
    database = uri[len(SQLITE):]
    os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
    lock = os.path.join(os.path.dirname(os.path.abspath(database)), f".{os.path.basename(database)}.lock")
    with open(lock, "a", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class MlflowLogger(TrackerLogger):
    """The run in MLflow: a parent run, a nested run per stage (optional extra ``mlflow``)."""

    name = "mlflow"
    Params = MlflowParams

    def __init__(self, params=None):
        super().__init__(params)
        self.client = None
        self.experiment_id: str | None = None
        self.tags: dict[str, str] = {}  # set on the stage runs too

    def call_context(self):
        """MLflow's HTTP limits for this logger's requests, unless the user set them."""
        return _environment({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(RETRIES),
                             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(self.params.timeout_s)))}, quiet=("urllib3",))

    def tracking_uri(self, identity: Identity) -> str:
        return self.params.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(identity)

    def destination(self, run, identity: Identity) -> dict:
        return {"tracking_uri": self.tracking_uri(identity), "experiment": self.params.experiment or identity.experiment}

    def open_run(self, run, identity: Identity) -> None:
        from mlflow.tracking import MlflowClient

        uri, experiment = self.state["destination"]["tracking_uri"], self.state["destination"]["experiment"]
        with _store_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(experiment, uri)
        run_id = self.state.get("run_id")
        if run_id and self._reopen(run_id):
            self.client.set_tag(run_id, "resumed", "true")
        else:
            tags = {**identity.tags(), "mlflow.source.git.commit": identity.git_commit or ""}
            created = self.client.create_run(self.experiment_id, run_name=identity.name,
                                             tags={key: value for key, value in tags.items() if value})
            self.state.update(run_id=created.info.run_id, stages={})
        self.tags = {key: value for key, value in identity.tags().items() if key != "run_folder"}
        self._log_params(self.state["run_id"], flatten(run.recipe.data))
        _unfinished[self.state["run_id"]] = self  # a logger of an earlier, stopped attempt has no say any more

    def _experiment(self, name: str, uri: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if uri.startswith(SQLITE):  # MLflow's default would be ./mlruns under the current directory
            location = pathlib.Path(os.path.dirname(os.path.abspath(uri[len(SQLITE):])), ARTEFACT_FOLDER).as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _reopen(self, run_id: str) -> bool:
        """Set a stored run running again; False when the tracker no longer has it."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_run(run_id)
        except MlflowException as error:
            if getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        if found.info.lifecycle_stage == "deleted":
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def _log_params(self, run_id: str, values: dict[str, Any]) -> None:
        """Params not logged yet (MLflow refuses to change one: a run continued with
        a changed recipe keeps the values it started with)."""
        from mlflow.entities import Param

        logged = self.client.get_run(run_id).data.params
        params = [Param(_key(key), _text(value)) for key, value in values.items() if _key(key) not in logged]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[start:start + PARAMS_PER_BATCH])

    def _log_metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(_key(key), value, stamp, step) for key, value in values.items()])

    def open_stage(self, run, stage_id: str, plan: dict[str, Any]) -> None:
        state = self.stage_state(stage_id)
        if not (state["run_id"] and self._reopen(state["run_id"])):
            tags = {**self.tags, "stage": stage_id, "mlflow.parentRunId": self.state["run_id"]}
            created = self.client.create_run(self.experiment_id, run_name=stage_id, tags=tags)
            state.update(run_id=created.info.run_id, epoch=0, done=False)
        self._log_params(state["run_id"], plan)

    def log_epoch(self, stage_id: str, record: EpochRecord) -> None:
        self._log_metrics(self.stage_state(stage_id)["run_id"], epoch_metrics(record), record.epoch)

    def close_stage(self, stage_id: str, result: StageResult) -> None:
        metrics = result_metrics(result)
        stage_run = self.stage_state(stage_id)["run_id"]
        self._log_metrics(stage_run, metrics, result.best_epoch)
        self._log_metrics(self.state["run_id"], {f"{stage_id}/{key}": value for key, value in metrics.items()}, 0)
        self.client.set_terminated(stage_run, status="FINISHED")

    def close_run(self, run, files: list[str]) -> None:
        for path in files:
            folder = os.path.relpath(os.path.dirname(path), self.folder)
            self.client.log_artifact(self.state["run_id"], path, None if folder == "." else folder)
        self.client.set_terminated(self.state["run_id"], status="FINISHED")
        _unfinished.pop(self.state["run_id"], None)

    def abandon(self) -> None:
        """At exit of a run that stopped early: its open MLflow runs are marked KILLED
        (``--resume`` sets them running again)."""
        open_runs = [state["run_id"] for state in self.state.get("stages", {}).values() if state.get("run_id") and not state.get("done")]
        for run_id in [*open_runs, self.state.get("run_id")]:
            if run_id:
                self.guard.call("mark its run as stopped", self.client.set_terminated, run_id, status="KILLED")


@atexit.register
def _abandon_unfinished() -> None:
    for logger in list(_unfinished.values()):
        logger.abandon()
    _unfinished.clear()


@contextlib.contextmanager
def _environment(values: dict[str, str], quiet: tuple[str, ...] = ()):
    """Set environment variables the user has not set, for the duration of a call;
    the ``quiet`` loggers say only errors (a retry is not the one warning a failure gives)."""
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@hookimpl
def pyramidkd_register_loggers():
    return [MlflowLogger]
