"""The built-in launchers run real (tiny) runs: ``local`` in child processes,
``ray`` on a local Ray instance, ``slurm`` through submitit's local executor (and
its submission script, checked as text). A run that crashes its process is
reported as failed and the others finish; Ray gives the same figures as local."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest

from conftest import TINY_RECIPE
from pyramidkd import testing
from pyramidkd.engine import JobOutcome, LaunchContext, RecipeError, RunJob, UserError, install_hint
from pyramidkd.plugins.launchers import local, slurm

# Loaded by the recipes below from their folder: the probe records what the run's
# process saw; seed 1 exits with code 3, seed 2 kills itself, seed 5 trains until stopped.
PROBE_PLUGIN = """
import json, os, signal
import torch
from pyramidkd.engine import hookimpl

@hookimpl
def pyramidkd_run_start(run):
    seen = {"pid": os.getpid(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "order": os.environ.get("CUDA_DEVICE_ORDER"),
            "omp": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}
    with open(os.path.join(run.directory.path, "probe.json"), "w") as handle:
        json.dump(seen, handle)
    if run.seed == 1:
        os._exit(3)
    if run.seed == 2:
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    (tmp_path / "probe.py").write_text(PROBE_PLUGIN)
    path = tmp_path / "recipe.toml"
    path.write_text(TINY_RECIPE.replace('[experiment]\n', '[experiment]\nplugins = ["probe"]\n', 1))
    return path


def make_job(tmp_path: Path, recipe: Path, seed: int, *, cell: str = "tiny", threads: int | None = None,
             overrides: tuple[str, ...] = ()) -> RunJob:
    sweep = tmp_path / "sweep"
    return RunJob(key=f"{cell}/seed-{seed}", cell=cell, seed=seed, recipe=str(recipe),
                  overrides=(f"experiment.seed={seed}", *overrides), folder=str(sweep / cell / f"seed-{seed}"),
                  log_file=str(sweep / "logs" / f"{cell}.seed-{seed}.log"), threads=threads)


def context(tmp_path: Path) -> LaunchContext:
    return LaunchContext(folder=str(tmp_path / "sweep"), scratch=str(tmp_path / "sweep" / ".launcher"), sweep="tiny-sweep")


def launch(launcher, jobs: list[RunJob], tmp_path: Path) -> dict[str, JobOutcome]:
    """Launch and return the outcomes by key, checking that each job is reported
    exactly once, from the calling thread."""
    caller, reported = threading.current_thread(), []

    def on_done(outcome):
        assert threading.current_thread() is caller, "on_done called from another thread"
        reported.append(outcome)

    launcher.launch(jobs, on_done, context(tmp_path))
    assert sorted(o.key for o in reported) == sorted(job.key for job in jobs)
    return {o.key: o for o in reported}


def summary(job: RunJob) -> dict:
    return json.loads((Path(job.folder) / "summary.json").read_text())


def probe(job: RunJob) -> dict:
    return json.loads((Path(job.folder) / "probe.json").read_text())


def figures(job: RunJob) -> dict:
    return {s["stage"]: (s["test_acc"], s["best_val_acc"], s["test_loss"]) for s in summary(job)["stages"]}


# --- local ------------------------------------------------------------------


def test_local_runs_each_job_in_a_child_process_with_its_threads_and_gpu(tmp_path, recipe, monkeypatch):
    jobs = [make_job(tmp_path, recipe, seed) for seed in (0, 3, 4)]
    # The sweep was given GPUs 4-7 (by a scheduler, say): gpus are indices into those.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    launcher = testing.build_component("launcher", "local", {"workers": 2, "threads": 1, "gpus": [1, 2]})
    outcomes = launch(launcher, jobs, tmp_path)
    for job in jobs:
        assert outcomes[job.key].ok, outcomes[job.key]
        assert [s["stage"] for s in summary(job)["stages"]] == ["teacher", "student"]
        seen = probe(job)
        assert seen["pid"] != os.getpid()
        assert seen["omp"] == "1" and seen["torch_threads"] == 1
        assert seen["cuda"] in ("5", "6")  # each worker's GPU, as the sweep names it (the recipe trains on the CPU)
        assert seen["order"] == "PCI_BUS_ID"  # ids as nvidia-smi numbers them
        assert f"== {job.key}: done" in Path(job.log_file).read_text()
    assert len({probe(job)["pid"] for job in jobs}) == 3


def test_a_run_that_kills_its_process_is_reported_failed_and_the_others_finish(tmp_path, recipe):
    jobs = [make_job(tmp_path, recipe, seed) for seed in (1, 2, 0)]
    outcomes = launch(testing.build_component("launcher", "local", {"workers": 2, "threads": 1}), jobs, tmp_path)
    exited, killed, fine = (outcomes[job.key] for job in jobs)
    assert fine.ok and (Path(jobs[2].folder) / "summary.json").exists()
    assert exited.status == "failed" and "exited with code 3" in exited.error and jobs[0].log_file in exited.error
    assert killed.status == "failed" and "killed by SIGKILL" in killed.error and jobs[1].log_file in killed.error
    assert "killed by SIGKILL" in Path(jobs[1].log_file).read_text()


def test_ctrl_c_stops_the_running_children_reports_them_and_is_raised(tmp_path, recipe):
    quick = make_job(tmp_path, recipe, 1)  # exits at once: its report is where Ctrl-C "arrives"
    endless = make_job(tmp_path, recipe, 5, overrides=("train.epochs=100000",))
    reported = []

    def on_done(outcome):
        reported.append(outcome)
        if outcome.key == quick.key:
            raise KeyboardInterrupt

    launcher = testing.build_component("launcher", "local", {"workers": 2, "threads": 1})
    with pytest.raises(KeyboardInterrupt):
        launcher.launch([quick, endless], on_done, context(tmp_path))
    assert [o.key for o in reported] == [quick.key, endless.key]
    stopped = reported[1]
    assert stopped.status == "failed" and "SIGINT" in stopped.error  # saved and stopped (or stopped while starting)
    assert not (Path(endless.folder) / "summary.json").exists()


def test_the_children_die_with_the_sweep_process_even_by_sigkill(tmp_path, recipe):
    job = make_job(tmp_path, recipe, 5, overrides=("train.epochs=100000",))
    script = tmp_path / "sweep_process.py"
    script.write_text(textwrap.dedent(f"""
        from pyramidkd.engine import LaunchContext, RunJob
        from pyramidkd.plugins.launchers.local import LocalLauncher
        job = RunJob.from_dict({job.to_dict()!r})
        LocalLauncher(LocalLauncher.Params(threads=1)).launch([job], print, LaunchContext({str(tmp_path)!r}, {str(tmp_path / "scratch")!r}, "t"))
    """))
    sweep = subprocess.Popen([sys.executable, str(script)])
    try:
        child = wait_for(lambda: (Path(job.folder) / "probe.json").exists() and probe(job)["pid"], "the run to start")
    finally:
        sweep.kill()
        sweep.wait()
    wait_for(lambda: not alive(child), f"the run's process {child} to die with the sweep")


def wait_for(condition, what: str, limit_s: float = 300.0):
    """Poll until ``condition()`` is truthy; the limit only keeps a broken test from hanging."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"gave up waiting for {what}")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie no parent reaped yet counts as dead)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_worker_slots_threads_and_environment(monkeypatch):
    assert local.worker_slots(3, ["0", "1"]) == ["0", "1", "0"]  # more workers than GPUs: they take turns
    assert local.worker_slots(2, []) == [None, None]
    env = local.child_environment({"CUDA_VISIBLE_DEVICES": "3", "PATH": "/bin"}, 4, None)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["PATH"] == "/bin"  # no GPU to hand out: left as it is
    assert all(env[name] == "4" for name in local.THREAD_VARIABLES)
    assert local.child_environment({"CUDA_VISIBLE_DEVICES": "3"}, 1, "1")["CUDA_VISIBLE_DEVICES"] == "1"

    import torch

    monkeypatch.setattr(local, "available_cpus", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    one_gpu = local.LocalLauncher(local.LocalParams(workers=3))
    assert one_gpu.threads == 2 and one_gpu.gpus == [] and one_gpu.describe() == "local: 3 workers x 2 threads"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert local.LocalLauncher(local.LocalParams(workers=2)).gpus == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7,9")  # the devices torch counts are the first ones listed
    assert local.visible_gpus() == ["4", "7"]
    # explicit gpus index the visible list: GPU 1 of "4,7,9" is the parent's 7
    assert local.LocalLauncher(local.LocalParams(threads=3, gpus=[1])).describe() == "local: 1 worker x 3 threads, GPUs 7"


def test_explicit_gpus_are_indices_into_the_parents_visible_devices(monkeypatch):
    assert local.chosen_gpus([0, 1], None) == ["0", "1"]  # nothing hidden: indices are nvidia-smi's ids
    assert local.chosen_gpus([1, 0], "2,3") == ["3", "2"]
    assert local.chosen_gpus([0], "GPU-a1b2, GPU-c3d4") == ["GPU-a1b2"]  # UUIDs pass through
    with pytest.raises(UserError, match="launcher.gpus") as raised:
        local.chosen_gpus([0, 2], "2,3")
    assert "[2] is not among them" in str(raised.value) and "indices 0 to 1" in str(raised.value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    launcher = local.LocalLauncher(local.LocalParams(workers=3, gpus=[1, 0]))
    assert local.worker_slots(3, launcher.gpus) == ["3", "2", "3"]


def test_children_number_gpus_as_nvidia_smi_does():
    env = local.child_environment({"PATH": "/bin"}, 1, "3")
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CUDA_VISIBLE_DEVICES"] == "3"
    assert local.child_environment({"PATH": "/bin"}, 1, None)["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    # an order the sweep's environment chose is kept: its CUDA_VISIBLE_DEVICES ids are in that order
    assert local.child_environment({"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, 1, "3")["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_the_launchers_params_are_validated():
    for params, key in [({"workers": 0}, "launcher.workers"), ({"threads": -1}, "launcher.threads"),
                        ({"gpus": [-1]}, "launcher.gpus")]:
        with pytest.raises(RecipeError, match=key):
            testing.build_component("launcher", "local", params)
    with pytest.raises(RecipeError, match="launcher.num_cpus"):
        testing.build_component("launcher", "ray", {"num_cpus": 0})
    with pytest.raises(RecipeError, match="launcher.executor"):
        testing.build_component("launcher", "slurm", {"executor": "cloud"})
    with pytest.raises(RecipeError, match="did you mean 'cpus_per_task'"):
        testing.build_component("launcher", "slurm", {"cpu_per_task": 4})


# --- ray --------------------------------------------------------------------


def test_ray_runs_each_job_as_a_task_with_the_same_figures_as_local(tmp_path, recipe):
    ray = pytest.importorskip("ray", reason="the ray launcher needs ray (pip install 'pyramidkd[ray]')")
    assert not ray.is_initialized()
    by_local = make_job(tmp_path, recipe, 0, cell="local")
    launch(testing.build_component("launcher", "local", {"threads": 1}), [by_local], tmp_path)
    same, crashed = make_job(tmp_path, recipe, 0, cell="ray"), make_job(tmp_path, recipe, 1, cell="ray")
    missing = make_job(tmp_path, tmp_path / "missing.toml", 0, cell="missing")
    outcomes = launch(testing.build_component("launcher", "ray", {"num_cpus": 1}), [same, crashed, missing], tmp_path)
    assert not ray.is_initialized()  # the launcher started its Ray instance, and shut it down
    assert outcomes[same.key].ok, outcomes[same.key]
    assert figures(same) == figures(by_local)
    assert probe(same)["torch_threads"] == 1 and probe(same)["pid"] != os.getpid()
    assert outcomes[crashed.key].status == "failed" and crashed.log_file in outcomes[crashed.key].error
    assert outcomes[missing.key].status == "failed" and "missing.toml" in outcomes[missing.key].error


# --- slurm ------------------------------------------------------------------


def test_slurm_through_submitits_local_executor_runs_the_jobs(tmp_path, recipe, monkeypatch):
    submitit = pytest.importorskip("submitit", reason="the slurm launcher needs submitit (pip install 'pyramidkd[slurm]')")
    # submitit waits 15 s for the result file of a task that ended without one (slow shared
    # file systems); the crashed task never writes it, and this file system is local.
    monkeypatch.setattr(submitit.local.local.LocalJob, "_results_timeout_s", 1)
    fine, crashed = make_job(tmp_path, recipe, 0), make_job(tmp_path, recipe, 1)
    launcher = testing.build_component("launcher", "slurm", {"executor": "local", "time": 30})
    outcomes = launch(launcher, [fine, crashed], tmp_path)
    assert outcomes[fine.key].ok, outcomes[fine.key]
    assert figures(fine)["student"][0] >= 0 and probe(fine)["torch_threads"] == 1
    assert outcomes[crashed.key].status == "failed" and crashed.log_file in outcomes[crashed.key].error
    assert list((tmp_path / "sweep" / ".launcher" / "slurm").glob("*_log.out"))


def test_the_slurm_submission_script_is_one_array_with_the_launchers_options(tmp_path):
    pytest.importorskip("submitit", reason="the slurm launcher needs submitit (pip install 'pyramidkd[slurm]')")
    params = testing.build_component("launcher", "slurm", {
        "partition": "gpu", "time": 90, "cpus_per_task": 4, "gpus_per_task": 1, "mem_gb": 16, "array_parallelism": 2,
        "account": "lab", "qos": "high", "setup": ["module load cuda", "source ~/kd/bin/activate"],
        "additional": {"constraint": "a100"}}).params
    script = slurm.submission_script(params, 5, str(tmp_path / "slurm"), "kd-temperature")
    lines = script.splitlines()
    for option in ("--array=0-4%2", "--partition=gpu", "--time=90", "--cpus-per-task=4", "--gpus-per-task=1",
                   "--mem=16GB", "--account=lab", "--qos=high", "--constraint=a100", "--job-name=kd-temperature"):
        assert f"#SBATCH {option}" in lines, option
    setup = lines.index("module load cuda")
    assert lines[setup + 1] == "source ~/kd/bin/activate"
    assert setup < next(i for i, line in enumerate(lines) if line.startswith("srun"))
    assert "-m submitit.core._submit" in script


# --- missing extras -----------------------------------------------------------


@pytest.mark.parametrize("launcher, module, extra", [("ray", "ray", "ray"), ("slurm", "submitit", "slurm")])
def test_a_missing_extra_names_its_pip_install(launcher, module, extra, monkeypatch, tmp_path):
    instance = testing.build_component("launcher", launcher, {})
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(RecipeError) as validation:
        testing.build_component("launcher", launcher, {})
    assert install_hint(extra) in str(validation.value)  # the checkout's .venv/bin/pip install -e '.[ray]' here
    with pytest.raises(UserError) as launching:
        instance.launch([], lambda outcome: None, context(tmp_path))
    assert install_hint(extra) in str(launching.value)


# --- a third-party launcher ---------------------------------------------------------


def test_the_docs_launcher_example_runs_a_sweeps_jobs(tmp_path):
    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", docs, re.DOTALL) if 'name = "inline"' in b)
    module = types.ModuleType("docs_inline_launcher")
    exec(compile(block, "<docs/plugins.md:inline>", "exec"), module.__dict__)
    launcher = testing.build_component("launcher", "inline", {"retries": 1}, extra_plugins=[module])
    assert launcher.describe() == "inline: one run at a time in this process (retries = 1)"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(TINY_RECIPE)
    fine, missing = make_job(tmp_path, recipe, 0), make_job(tmp_path, tmp_path / "missing.toml", 0, cell="missing")
    outcomes = launch(launcher, [fine, missing], tmp_path)
    assert outcomes[fine.key].ok and (Path(fine.folder) / "summary.json").exists()
    assert outcomes[missing.key].status == "failed"
