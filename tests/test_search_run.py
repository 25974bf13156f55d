"""``pyramidkd search`` end to end with the local launcher: trials as ordinary run
folders scored on validation accuracy, the results and plots, the best values
re-run on fresh seeds for their test accuracy, a continued search that adds
trials without redoing finished ones, and a SIGKILLed search whose re-run counts
each trial once (the killed trial continues in its own run folder)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from conftest import TINY_RECIPE
from pyramidkd.engine.cli import main
from pyramidkd.engine.records import load_summary
from pyramidkd.engine.rundir import lock_held

SEARCH = """
[search]
name = "tiny-search"
recipe = "tiny.toml"
seeds = [0]
trials = 3
sampler = "random"
final_seeds = {final_seeds}
set = {{ "train.epochs" = {epochs} }}

[space]
"stages.student.loss.temperature" = {{ low = 1.0, high = 8.0, log = true }}
"stages.student.loss.alpha" = {{ low = 0.1, high = 0.9, step = 0.1 }}

[launcher]
name = "local"
workers = 1
"""
TIMEOUT = 600


def write_search(folder, *, final_seeds: str = "[100]", epochs: int = 2) -> str:
    (folder / "tiny.toml").write_text(TINY_RECIPE)
    path = folder / "search.toml"
    path.write_text(SEARCH.format(final_seeds=final_seeds, epochs=epochs))
    return str(path)


def search_command(path: str, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pyramidkd", "search", path, "--output", str(out), *extra]


def run_search(path: str, out, *extra: str) -> tuple[int, str, str]:
    """``pyramidkd search`` in this process (its runs are child processes all the same)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["search", path, "--output", str(out), *extra])
    return code, stdout.getvalue(), stderr.getvalue()


def study_trials(out) -> list:
    study = optuna.load_study(study_name="tiny-search", storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials()


def job_starts(out, trial: int) -> int:
    """How often a run of the trial was started (each start writes one line to its log)."""
    log = out / "logs" / f"trial-{trial}.seed-0.log"
    return log.read_text().count(f"== trial-{trial}/seed-0: pyramidkd run") if log.exists() else 0


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    path = write_search(folder)
    out = folder / "out"
    return path, out, run_search(path, out)


def test_a_search_runs_trials_as_run_folders_and_reports_validation(finished_search):
    path, out, (code, stdout, stderr) = finished_search
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert [t["number"] for t in results["trials"]] == [0, 1, 2] and results["counts"]["complete"] == 3
    for trial in results["trials"]:
        run = out / f"trial-{trial['number']}" / "seed-0"
        summary = load_summary(str(run))
        assert trial["value"] == summary.stage("student").best_val_acc  # selected on validation, never test
        recipe = (run / "recipe.toml").read_text()
        assert f"alpha = {trial['values']['stages.student.loss.alpha']}" in recipe and "epochs = 2" in recipe
    best = max(results["trials"], key=lambda t: t["value"])
    assert results["best"]["number"] == best["number"]
    assert (out / "plots" / "history.png").stat().st_size > 0 and (out / "plots" / "importance.png").exists()
    assert (out / "results.csv").read_text().count("\n") == 4 and "TEST accuracy" in (out / "results.md").read_text()
    assert "best trial:" in stdout and "search tiny-search: 3 trial(s) — 3 complete" in stdout


def test_the_best_values_are_re_run_on_fresh_seeds_for_their_test_accuracy(finished_search):
    path, out, (code, stdout, stderr) = finished_search
    results = json.loads((out / "results.json").read_text())
    final = results["final"]
    assert final["trial"] == results["best"]["number"] and final["seeds"] == [100] and not final["failed"]
    run = out / "final" / f"trial-{final['trial']}" / "seed-100"
    summary = load_summary(str(run))
    assert summary.seed == 100 and final["test_acc"]["values"] == [summary.stage("student").test_acc]
    assert f"alpha = {final['values']['stages.student.loss.alpha']}" in (run / "recipe.toml").read_text()
    assert "TEST accuracy of stage 'student'" in stdout and "fresh seeds 100" in stdout


def test_running_again_with_more_trials_adds_them_and_keeps_the_finished(finished_search):
    path, out, first = finished_search
    before = {n: os.stat(out / f"trial-{n}" / "seed-0" / "summary.json").st_mtime_ns for n in range(3)}
    params = [t.params for t in study_trials(out)]
    code, stdout, stderr = run_search(path, out, "--trials", "4")
    assert code == 0, stderr
    trials = study_trials(out)
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in trials)
    assert [t.params for t in trials[:3]] == params and trials[3].params not in params  # new values, not a repeat
    assert {n: os.stat(out / f"trial-{n}" / "seed-0" / "summary.json").st_mtime_ns for n in range(3)} == before
    assert [job_starts(out, n) for n in range(4)] == [1, 1, 1, 1]
    assert "trial 3 starts" in stderr and "trial 0 starts" not in stderr


def test_a_search_killed_mid_trial_continues_with_each_trial_counted_once(tmp_path):
    path = write_search(tmp_path, final_seeds="[]", epochs=10)
    out = tmp_path / "out"
    process = subprocess.Popen(search_command(path, out, "--trials", "2"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while job_starts(out, 1) == 0:  # trial 1's run has started
            assert process.poll() is None and time.monotonic() < deadline, "the search ended before trial 1 ran"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    run = out / "trial-1" / "seed-0"
    while lock_held(str(run / ".lock")) and time.monotonic() < deadline:  # its run died with it (PDEATHSIG)
        time.sleep(0.1)
    states = {t.number: t.state.name for t in study_trials(out)}
    assert states == {0: "COMPLETE", 1: "RUNNING"}
    killed_params = study_trials(out)[1].params

    code, stdout, stderr = run_search(path, out, "--trials", "2")
    assert code == 0, stderr
    trials = study_trials(out)
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert trials[1].params == killed_params and "trial 1 continues" in stderr and "trial 0 starts" not in stderr
    assert [job_starts(out, n) for n in range(2)] == [1, 2]  # trial 1 resumed in its own folder, trial 0 kept
    assert trials[1].value == load_summary(str(run)).stage("student").best_val_acc
    results = json.loads((out / "results.json").read_text())
    assert results["counts"] == {"complete": 2, "pruned": 0, "fail": 0, "running": 0} and results["final"] is None
