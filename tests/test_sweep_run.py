"""``pyramidkd sweep`` end to end with the local launcher: ordinary run folders,
results, re-runs that keep finished runs, failures recorded while the others go
on, one sweep per folder (diff, --force, lock), and a SIGKILLed sweep whose re-run
ends with exactly the figures of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import TINY_RECIPE
from pyramidkd.engine.sweeps.folder import SweepFolder

SWEEP = """
[sweep]
name = "tiny-sweep"
recipe = "tiny.toml"
seeds = [0, 1]
baseline = {{ "stages.student.loss.temperature" = 4.0 }}
set = {{ "train.epochs" = {epochs}{set_extra} }}

[grid]
"stages.student.loss.temperature" = [2.0, 4.0]

[launcher]
name = "local"
workers = 2
"""


def write_sweep(folder, *, epochs: int = 2, set_extra: str = "") -> str:
    (folder / "tiny.toml").write_text(TINY_RECIPE)
    path = folder / "sweep.toml"
    path.write_text(SWEEP.format(epochs=epochs, set_extra=set_extra))
    return str(path)


def figures(results_file) -> dict:
    with open(results_file, encoding="utf-8") as handle:
        results = json.load(handle)
    return {(cell["id"], stage): data["test_acc"]["values"] + data["best_val_acc"]["values"]
            for cell in results["cells"] for stage, data in cell["stages"].items()}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """One uninterrupted sweep (2 cells x 2 seeds), run through the real command line."""
    folder = tmp_path_factory.mktemp("sweep")
    path = write_sweep(folder)
    out = folder / "out"
    result = subprocess.run([sys.executable, "-m", "pyramidkd", "sweep", path, "--output", str(out)],
                            capture_output=True, text=True, timeout=600)
    return path, out, result


def test_a_sweep_writes_run_folders_and_results(finished_sweep, cli):
    path, out, result = finished_sweep
    assert result.returncode == 0, result.stderr
    for cell in ("temperature=2.0", "temperature=4.0"):
        for seed in (0, 1):
            run = out / cell / f"seed-{seed}"
            summary = json.loads((run / "summary.json").read_text())
            assert summary["seed"] == seed and [s["stage"] for s in summary["stages"]] == ["teacher", "student"]
            assert f"temperature = {cell.split('=')[1]}" in (run / "recipe.toml").read_text()
            assert (out / "logs" / f"{cell}.seed-{seed}.log").exists()
    results = json.loads((out / "results.json").read_text())
    assert [c["id"] for c in results["cells"]] == ["temperature=2.0", "temperature=4.0"]
    cell = results["cells"][0]
    assert cell["overrides"] == {"train.epochs": 2, "stages.student.loss.temperature": 2.0} and cell["seeds"] == [0, 1]
    test_acc = cell["stages"]["student"]["test_acc"]
    expected = [json.loads((out / "temperature=2.0" / f"seed-{s}" / "summary.json").read_text())["stages"][1]["test_acc"] for s in (0, 1)]
    assert test_acc["values"] == expected and test_acc["n"] == 2
    assert (out / "results.csv").exists() and (out / "results.md").exists()
    assert "temperature=2.0" in result.stdout and "sweep tiny-sweep: 4 done, 0 running, 0 failed, 0 waiting" in result.stderr
    # each run folder is an ordinary one: report and resume work on it
    assert cli("report", out / "temperature=2.0" / "seed-1").code == 0
    resumed = cli("run", folder_recipe(path), "--output", out / "temperature=2.0" / "seed-1", "--resume",
                  "--set", "train.epochs=2", "--set", "stages.student.loss.temperature=2.0", "--set", "experiment.seed=1")
    assert resumed.code == 0, resumed.err


def folder_recipe(sweep_path: str) -> str:
    return os.path.join(os.path.dirname(sweep_path), "tiny.toml")


def test_running_it_again_keeps_the_finished_runs(finished_sweep, cli):
    path, out, _ = finished_sweep
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/summary.json")}
    result = cli("sweep", path, "--output", out)
    assert result.code == 0, result.err
    assert "4 of 4 run(s) finished earlier: kept" in result.err
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/summary.json")} == before


def test_a_different_sweep_is_refused_with_a_diff_unless_forced(finished_sweep, cli, tmp_path):
    path, out, _ = finished_sweep
    changed = tmp_path / "changed.toml"
    changed.write_text(open(path).read().replace("[2.0, 4.0]", "[4.0, 8.0]"))
    (tmp_path / "tiny.toml").write_text(TINY_RECIPE)
    result = cli("sweep", changed, "--output", out, "--dry-run")
    assert result.code == 0 and "holds a different sweep: running it needs --force" in result.out
    result = cli("sweep", changed, "--output", out)
    assert result.code == 1 and "holds a different sweep" in result.err
    assert "-cell temperature=2.0: tiny.toml --set train.epochs=2 --set stages.student.loss.temperature=2.0\n" in result.err
    assert "+cell temperature=8.0: tiny.toml" in result.err and "-baseline" not in result.err
    assert "--force" in result.err
    assert cli("sweep", changed, "--output", out, "--force").code == 0
    assert json.loads((out / "sweep.json").read_text())["cells"][1]["id"] == "temperature=8.0"
    assert cli("sweep", path, "--output", out, "--force").code == 0  # back, for the other tests


def test_two_sweeps_cannot_write_one_folder(finished_sweep, cli):
    path, out, _ = finished_sweep
    with SweepFolder(str(out)).lock():
        result = cli("sweep", path, "--output", out)
    assert result.code == 1 and "another sweep is writing this folder" in result.err


CRASHING_PLUGIN = """
from pyramidkd.engine import hookimpl

@hookimpl
def pyramidkd_stage_start(run, stage):
    if stage.id == "student" and run.seed == 1:
        raise RuntimeError("the student of seed 1 breaks")
"""


def test_a_failed_run_is_recorded_and_the_others_go_on(tmp_path, cli):
    path = write_sweep(tmp_path, set_extra=', "experiment.plugins" = ["crashing"]')
    (tmp_path / "crashing.py").write_text(textwrap.dedent(CRASHING_PLUGIN))
    out = tmp_path / "out"
    result = cli("sweep", path, "--output", out)
    assert result.code == 1
    assert "2 run(s) failed:" in result.err
    for cell in ("temperature=2.0", "temperature=4.0"):
        assert f"{cell}/seed-1: " in result.err and "the student of seed 1 breaks" in result.err
        assert str(out / cell / "seed-1") in result.err and str(out / "logs" / f"{cell}.seed-1.log") in result.err
        assert (out / cell / "seed-0" / "summary.json").exists()
        assert (out / cell / "seed-1" / "checkpoints" / "teacher" / "best.pt").exists()
    state = json.loads((out / "sweep-state.json").read_text())["runs"]
    assert state["temperature=2.0/seed-1"]["status"] == "failed" and state["temperature=2.0/seed-0"]["status"] == "done"
    results = json.loads((out / "results.json").read_text())
    assert results["cells"][0]["seeds"] == [0] and results["cells"][0]["failed"][0]["seed"] == 1
    # Fixed, the same command runs just the failed runs, continuing after their teachers.
    (tmp_path / "crashing.py").write_text("")
    result = cli("sweep", path, "--output", out)
    assert result.code == 0, result.err
    assert "2 of 4 run(s) finished earlier: kept" in result.err
    log = (out / "logs" / "temperature=2.0.seed-1.log").read_text()
    assert "reusing" in log or "reuse" in log
    assert json.loads((out / "results.json").read_text())["cells"][0]["seeds"] == [0, 1]


def _epochs_written(out) -> int:
    total = 0
    for metrics in out.glob("*/seed-*/metrics.jsonl"):
        total += sum('"kind": "epoch"' in line for line in metrics.read_text().splitlines())
    return total


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def six_epoch_sweep(tmp_path_factory):
    """A sweep file whose runs train long enough to be killed midway, and its
    uninterrupted results."""
    folder = tmp_path_factory.mktemp("six")
    path = write_sweep(folder, epochs=6)
    reference = folder / "reference"
    result = subprocess.run([sys.executable, "-m", "pyramidkd", "sweep", path, "--output", str(reference)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return path, reference


@pytest.mark.parametrize("kill_after_epochs", [3, 14])
def test_a_sigkilled_sweep_ends_with_the_figures_of_an_uninterrupted_one(six_epoch_sweep, tmp_path, cli, kill_after_epochs):
    """Kill the sweep process (SIGKILL: no clean-up at all) while its runs train,
    then run the same command: the runs continue from their last checkpoints and
    the results equal an uninterrupted sweep's, to the last digit."""
    path, reference = six_epoch_sweep
    out = tmp_path / "out"
    sweep = subprocess.Popen([sys.executable, "-m", "pyramidkd", "sweep", path, "--output", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _epochs_written(out) < kill_after_epochs and sweep.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert sweep.poll() is None, "the sweep ended before it could be killed"
    children = subprocess.run(["pgrep", "-P", str(sweep.pid)], capture_output=True, text=True).stdout.split()
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 30
    while any(_alive(int(pid)) for pid in children) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(int(pid)) for pid in children), "the runs outlived the killed sweep"
    assert not (out / "results.json").exists()
    result = cli("sweep", path, "--output", out)
    assert result.code == 0, result.err
    assert figures(out / "results.json") == figures(reference / "results.json")


def test_a_lock_counts_as_held_while_its_process_lives(tmp_path):
    """The live view's 'running': a lock file naming a live process (or one on another
    host, which cannot be checked); not an empty one, nor one a killed local process left."""
    import socket

    from pyramidkd.engine.rundir import LOCK_OWNER, lock_held

    lock = tmp_path / ".lock"
    assert not lock_held(str(lock))
    lock.write_text("")
    assert not lock_held(str(lock))
    lock.write_text(LOCK_OWNER.format(pid=os.getpid(), host=socket.gethostname()))
    assert lock_held(str(lock))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(LOCK_OWNER.format(pid=gone.pid, host=socket.gethostname()))
    assert not lock_held(str(lock))
    lock.write_text(LOCK_OWNER.format(pid=gone.pid, host="another-node"))
    assert lock_held(str(lock))
