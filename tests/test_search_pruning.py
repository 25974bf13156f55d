"""Pruning, deterministically: the monitor reads each epoch's validation accuracy
of the tuned stage from the runs' metrics.jsonl (the mean over a trial's seeds,
once every seed reached the epoch), reports it to the trial, and when the median
pruner says so tells the study PRUNED and stops the trial's runs."""

from __future__ import annotations

import json
import threading

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from pyramidkd.engine.search.trials import PruningMonitor, TrialWork, stage_epochs
from pyramidkd.engine.sweeps.folder import SweepFolder

SPACE = {"t": FloatDistribution(1.0, 8.0)}


def write_epochs(run_folder, stage: str, accuracies: list[float]) -> None:
    run_folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"kind": "epoch", "stage": "teacher", "epoch": 1, "val_acc": 0.99})]  # another stage: not read
    lines += [json.dumps({"kind": "epoch", "stage": stage, "epoch": i + 1, "val_acc": acc}) for i, acc in enumerate(accuracies)]
    (run_folder / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"kind\": \"ep")  # a line cut short is passed over


@pytest.fixture
def study():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    study.add_trial(create_trial(params={"t": 2.0}, distributions=SPACE, value=0.9,
                                 intermediate_values={1: 0.80, 2: 0.85, 3: 0.90}))
    return study


def monitor_for(study, tmp_path, work, stopped):
    return PruningMonitor(study, SweepFolder(str(tmp_path)), "student", work, threading.Lock(), say=lambda text: None,
                          stop=lambda folder: stopped.append(folder) or True)


def test_a_trial_below_the_median_is_pruned_and_its_runs_stopped(study, tmp_path):
    weak, strong = study.ask(SPACE), study.ask(SPACE)
    work = [TrialWork(weak, {"t": 1.0}, "trial-1", [0, 1]), TrialWork(strong, {"t": 4.0}, "trial-2", [0, 1])]
    write_epochs(tmp_path / "trial-1" / "seed-0", "student", [0.50, 0.55])
    write_epochs(tmp_path / "trial-1" / "seed-1", "student", [0.60])  # seed 1 is one epoch behind
    write_epochs(tmp_path / "trial-2" / "seed-0", "student", [0.95, 0.96])
    write_epochs(tmp_path / "trial-2" / "seed-1", "student", [0.97, 0.98])
    stopped = []
    assert monitor_for(study, tmp_path, work, stopped).poll() == [1]
    trials = study.get_trials()
    assert trials[1].state == TrialState.PRUNED and trials[1].intermediate_values == {1: pytest.approx(0.55)}
    assert trials[2].state == TrialState.RUNNING and trials[2].intermediate_values == {1: pytest.approx(0.96), 2: pytest.approx(0.97)}
    assert stopped == [str(tmp_path / "trial-1" / "seed-0"), str(tmp_path / "trial-1" / "seed-1")]
    assert work[0].ended == "pruned" and work[1].ended is None


def test_epochs_are_reported_once_and_finished_trials_are_left_alone(study, tmp_path):
    trial = study.ask(SPACE)
    work = [TrialWork(trial, {"t": 3.0}, "trial-1", [0])]
    write_epochs(tmp_path / "trial-1" / "seed-0", "student", [0.95])
    monitor = monitor_for(study, tmp_path, work, stopped := [])
    assert monitor.poll() == [] and monitor.poll() == []  # nothing new: no second report of epoch 1
    write_epochs(tmp_path / "trial-1" / "seed-0", "student", [0.95, 0.10])
    work[0].ended = "complete"  # told by the search meanwhile: the monitor must not touch it
    assert monitor.poll() == [] and stopped == []
    assert study.get_trials()[1].intermediate_values == {1: 0.95}


def test_stage_epochs_reads_only_the_tuned_stage(tmp_path):
    write_epochs(tmp_path / "run", "student", [0.5, 0.7])
    assert stage_epochs(str(tmp_path / "run"), "student") == {1: 0.5, 2: 0.7}
    assert stage_epochs(str(tmp_path / "missing"), "student") == {}
