"""The ``mlflow`` and ``wandb`` loggers, for real: MLflow against SQLite stores in
tmp (read back with MlflowClient), W&B in offline mode (read back from the
``.wandb`` file it writes). Nothing here reaches the network: the one server
asked for is a closed port on the loopback interface."""

from __future__ import annotations

import glob
import json
import logging
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pyramidkd import testing
from pyramidkd.engine import RecipeError, hookimpl

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")

from mlflow.tracking import MlflowClient  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

from pyramidkd.plugins.loggers import mlflow_tracker  # noqa: E402
from pyramidkd.plugins.loggers.tracking import Identity, find_sweep, flatten  # noqa: E402
from pyramidkd.plugins.loggers.wandb_tracker import tags as wandb_tags  # noqa: E402


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A SQLite MLflow store with its tables made (that takes seconds): copied where a test needs one."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def store(empty_store: Path, folder: Path) -> MlflowClient:
    shutil.copy(empty_store, folder / "mlflow.db")
    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def trackers(folder: Path) -> dict:
    return json.loads((folder / "run" / "trackers.json").read_text())


def epochs_logged(metrics_file: Path, stage: str) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return [(r["epoch"], r["val_acc"]) for r in records if r["kind"] == "epoch" and r["stage"] == stage]


def same_points(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    return [step for step, _ in logged] == [step for step, _ in expected] and \
        [value for _, value in logged] == pytest.approx([value for _, value in expected])


def stopper(epoch: int):
    """A plugin whose epoch_end raises at ``epoch`` (after `last` is saved), once."""
    state = {"armed": True, "at": epoch}

    @hookimpl
    def pyramidkd_epoch_end(run, stage, epoch, metrics):
        if state["armed"] and epoch == state["at"]:
            state["armed"] = False
            raise RuntimeError("stopped on purpose")

    return testing.plugin_module("stopper", pyramidkd_epoch_end=pyramidkd_epoch_end)


def wandb_records(path: str):
    """The records of a ``.wandb`` file: W&B's block format (7-byte file header,
    then chunks of ``<crc32 length type>`` in 32 KiB blocks) around protobuf Records."""
    data, block, position, pending = Path(path).read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:  # the zero padding at a block's end
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_offline(run_folder: Path) -> list[dict]:
    """Each offline run's id, run record, history rows, summary and saved files."""
    runs = []
    for path in sorted(glob.glob(str(run_folder / "wandb" / "offline-run-*" / "*.wandb"))):
        found = {"history": [], "summary": {}, "files": [], "config": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["run"] = record.run
                found["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                found["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                found["history"].append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                                         for item in record.history.item})
            elif kind == "summary":
                found["summary"].update({item.key: json.loads(item.value_json) for item in record.summary.update if item.key})
            elif kind == "files":
                found["files"] += [file.path for file in record.files.files]
        runs.append(found)
    return runs


def test_mlflow_run_with_nested_stages_params_metrics_artefacts_and_tags(empty_store, tmp_path):
    client = store(empty_store, tmp_path)  # the default store: beside the run folder
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    recipe = testing.tiny_recipe(loggers=["files", "mlflow"], epochs=2, seed=3)
    summary = testing.run_tiny(recipe, workdir=tmp_path)
    state = trackers(tmp_path)["mlflow"]
    assert state["destination"] == {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tiny"}
    parent = client.get_run(state["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "run"
    assert client.get_experiment(parent.info.experiment_id).name == "tiny"
    params = parent.data.params
    assert params["train.optimizer.lr"] == "0.05" and params["experiment.seed"] == "3"
    assert params["stages.student.scheme.teacher"] == "teacher" and params["stages.teacher.model.layers"] == '[8, "M", 8, "M"]'
    assert parent.data.tags["seed"] == "3" and parent.data.tags["run_folder"] == str(tmp_path / "run")
    assert parent.data.tags["git_commit"] == commit == parent.data.tags["mlflow.source.git.commit"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(child.info.run_name for child in children) == ["student", "teacher"]
    for stage in summary["stages"]:
        child = client.get_run(state["stages"][stage["stage"]]["run_id"])
        assert child.info.status == "FINISHED" and child.data.tags["stage"] == stage["stage"]
        assert child.data.params["loss.name"] == stage["loss"] and child.data.params["train.epochs"] == "2"
        history = [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert same_points(history, epochs_logged(tmp_path / "run" / "metrics.jsonl", stage["stage"]))
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")] == [1, 2]
        assert child.data.metrics["test_acc"] == pytest.approx(stage["test_acc"])
        assert parent.data.metrics[f"{stage['stage']}/test_acc"] == pytest.approx(stage["test_acc"])
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id)) == ["recipe.toml", "summary.json"]

    # The same command again: every stage reused, the same MLflow runs; plots that exist now go along.
    (tmp_path / "run" / "plots").mkdir()
    (tmp_path / "run" / "plots" / "student.png").write_bytes(b"\x89PNG")
    testing.run_tiny(recipe, workdir=tmp_path)
    assert trackers(tmp_path)["mlflow"]["run_id"] == parent.info.run_id
    assert len(client.search_runs([parent.info.experiment_id])) == 3
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/student.png"]


def test_resume_continues_the_same_tracker_runs_without_repeating_epochs(empty_store, tmp_path):
    client = store(empty_store, tmp_path)
    recipe = testing.tiny_recipe(loggers=["files", {"name": "mlflow", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
                                          "wandb"], teacher=False, epochs=3)
    with pytest.raises(Exception, match="stopped on purpose"):
        testing.run_tiny(recipe, workdir=tmp_path, extra_plugins=[stopper(2)])
    first = trackers(tmp_path)
    assert first["mlflow"]["stages"]["student"]["epoch"] == 1 and first["wandb"]["stages"]["student"]["epoch"] == 1

    from pyramidkd.engine.runner import run_recipe  # --resume
    run_recipe(str(tmp_path / "recipe.toml"), output=str(tmp_path / "run"), quiet=True, resume=True)
    second = trackers(tmp_path)
    assert second["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    stage_run = second["mlflow"]["stages"]["student"]["run_id"]
    assert stage_run == first["mlflow"]["stages"]["student"]["run_id"]
    assert client.get_run(stage_run).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(stage_run, "val_acc")] == [1, 2, 3]
    assert len(client.search_runs([client.get_run(stage_run).info.experiment_id])) == 2

    runs = wandb_offline(tmp_path / "run")
    assert [r["run"].run_id for r in runs] == [first["wandb"]["run_id"]] * 2
    epochs = [row["student/epoch"] for r in runs for row in r["history"] if "student/epoch" in row]
    assert epochs == [1, 2, 3]


def test_wandb_offline_run_has_config_history_summary_files_and_tags(tmp_path):
    recipe = testing.tiny_recipe(loggers=["files", {"name": "wandb", "project": "kd-tests"}], epochs=2)
    summary = testing.run_tiny(recipe, workdir=tmp_path)
    [run] = wandb_offline(tmp_path / "run")
    assert run["run"].run_id == trackers(tmp_path)["wandb"]["run_id"]
    assert run["run"].project == "kd-tests" and run["run"].display_name == "run" and list(run["run"].tags) == ["seed-0"]
    assert run["config"]["train.optimizer.lr"] == 0.05 and run["config"]["pyramidkd.seed"] == "0"
    assert run["config"]["plan.student.loss.name"] == summary["stages"][-1]["loss"]
    for stage in summary["stages"]:
        rows = [row for row in run["history"] if f"{stage['stage']}/epoch" in row]
        points = [(row[f"{stage['stage']}/epoch"], row[f"{stage['stage']}/val_acc"]) for row in rows]
        assert same_points(points, epochs_logged(tmp_path / "run" / "metrics.jsonl", stage["stage"]))
        assert run["summary"][f"{stage['stage']}/test_acc"] == pytest.approx(stage["test_acc"])
    assert sorted(run["files"]) == ["recipe.toml", "requirements.txt", "summary.json"]


def test_an_unreachable_server_costs_one_warning_and_the_run_finishes(tmp_path, caplog):
    recipe = testing.tiny_recipe(loggers=["files", {"name": "mlflow", "tracking_uri": "http://127.0.0.1:9", "timeout_s": 1}],
                                 teacher=False, epochs=2)
    with caplog.at_level(logging.WARNING, logger="pyramidkd"):
        summary = testing.run_tiny(recipe, workdir=tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "could not start its run" in warnings[0] and "127.0.0.1:9" in warnings[0]
    assert summary["stages"][0]["best_epoch"] >= 1 and (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "trackers.json").exists()  # no tracker run to continue


def test_a_tracker_that_fails_mid_run_catches_up_when_the_command_is_repeated(empty_store, tmp_path, monkeypatch, caplog):
    client = store(empty_store, tmp_path)
    recipe = testing.tiny_recipe(loggers=["files", "mlflow"], teacher=False, epochs=2)
    calls = []

    def failing(self, stage_id, record):
        calls.append(record.epoch)
        raise OSError("disk of the tracking server full")

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="pyramidkd"):
        patch.setattr(mlflow_tracker.MlflowLogger, "log_epoch", failing)
        summary = testing.run_tiny(recipe, workdir=tmp_path)
    assert calls == [1]  # switched off after the first failure
    assert [r.getMessage() for r in caplog.records if "mlflow logger" in r.getMessage()][0].startswith(
        "mlflow logger: could not log epoch 1 of stage 'student' (OSError: disk of the tracking server full)")
    testing.run_tiny(recipe, workdir=tmp_path)  # the same command: the stage is reused, the tracker filled in
    stage_run = trackers(tmp_path)["mlflow"]["stages"]["student"]["run_id"]
    assert [m.step for m in client.get_metric_history(stage_run, "val_acc")] == [1, 2]
    assert client.get_run(stage_run).data.metrics["test_acc"] == pytest.approx(summary["stages"][0]["test_acc"])


@pytest.mark.parametrize("logger", ["mlflow", "wandb"])
def test_a_missing_library_is_a_recipe_error_naming_the_key_and_the_install(logger, monkeypatch):
    monkeypatch.setitem(sys.modules, logger, None)
    with pytest.raises(RecipeError) as caught:
        testing.run_tiny(testing.tiny_recipe(loggers=["files", {"name": logger}], teacher=False))
    text = str(caught.value)
    assert "loggers[1]" in text and f"needs the {logger} package" in text and f"[{logger}]" in text and "pip install" in text


def test_only_the_main_rank_talks_to_the_tracker(tmp_path):
    logger = mlflow_tracker.MlflowLogger(mlflow_tracker.MlflowParams(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    logger.pyramidkd_run_start(types.SimpleNamespace(world=types.SimpleNamespace(is_main=False)))
    assert logger.guard.failed and not list(tmp_path.iterdir())


def test_a_sweep_run_is_named_by_its_cell_and_grouped_with_its_seeds(tmp_path):
    sweep = tmp_path / "runs" / "lr-sweep"
    (sweep / "lr_0.1" / "seed-2").mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "lr-sweep", "cells": [
        {"id": "base", "folder": "base"}, {"id": "lr=0.1", "folder": "lr_0.1"}]}))
    assert find_sweep(str(sweep / "lr_0.1" / "seed-2"), 2) == ("lr-sweep", "lr=0.1", str(sweep))
    assert find_sweep(str(sweep / "lr_0.1" / "seed-2"), 3) is None
    identity = Identity("tiny", "lr=0.1/seed-2", str(sweep / "lr_0.1" / "seed-2"), 2, "abc", "lr-sweep", "lr=0.1", str(sweep))
    assert mlflow_tracker.default_tracking_uri(identity) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert wandb_tags(identity) == ["seed-2", "git:abc", "sweep:lr-sweep", "cell:lr=0.1"]


def test_flatten_names_tables_by_key_path_and_stages_by_id():
    data = {"train": {"optimizer": {"lr": 0.1}}, "stages": [{"id": "t", "model": {"layers": [8, "M"]}}],
            "loggers": ["files", {"name": "mlflow"}]}
    assert flatten(data) == {"train.optimizer.lr": 0.1, "stages.t.id": "t", "stages.t.model.layers": '[8, "M"]',
                             "loggers.0": "files", "loggers.1.name": "mlflow"}
