"""Stopping a run: a second signal gives the same stop message as the first, and
the printed resume command works when pasted into a shell."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY_RECIPE
from pyramidkd.engine.training.stops import SavedPosition, StopFlag, resume_command

# A test-only plugin: sends itself signals from a batch hook (deterministic), or
# slows every step so that a signal from outside lands mid-run.
SIGNALLER = '''
import os, signal, time
from pyramidkd.engine import hookimpl

@hookimpl
def pyramidkd_batch_end(run, stage, epoch, step, num_steps, loss):
    time.sleep(float(os.environ.get("PYRAMIDKD_TEST_STEP_SLEEP", "0")))
    if os.environ.get("PYRAMIDKD_TEST_SIGNAL_AT") == f"{stage.id}:{epoch}:{step}":
        for _ in range(int(os.environ["PYRAMIDKD_TEST_SIGNALS"])):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs before the next signal
'''

# TINY_RECIPE with the plugin and smaller batches: 6 steps an epoch, 2 epochs a stage.
RECIPE = TINY_RECIPE.replace('device = "cpu"', 'device = "cpu"\nplugins = ["signaller"]').replace("batch_size = 32", "batch_size = 16")


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "signaller.py").write_text(SIGNALLER)
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE)
    yield path
    sys.modules.pop("signaller", None)


def stop_message(err: str) -> tuple[str, str]:
    """The ``stopped: ...`` line and the command after ``resume with:``."""
    stopped = next(line for line in err.splitlines() if line.startswith("stopped: "))
    command = next(line for line in err.splitlines() if "resume with: " in line).split("resume with: ", 1)[1]
    return stopped, command


def metrics(out) -> list[dict]:
    timing = {"epoch_time_s", "train_time_s", "time_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("signals", [1, 2])
def test_first_and_second_signal_give_the_stop_message(signals, recipe, tmp_path, cli, monkeypatch):
    reference = tmp_path / "reference"
    assert cli("run", recipe, "--quiet", "--output", reference).code == 0

    out = tmp_path / "stopped"
    monkeypatch.setenv("PYRAMIDKD_TEST_SIGNAL_AT", "teacher:2:3")
    monkeypatch.setenv("PYRAMIDKD_TEST_SIGNALS", str(signals))
    result = cli("run", recipe, "--quiet", "--output", out, "--set", "train.batch_size=16")
    assert result.code == 128 + signal.SIGINT, result.err
    assert "Traceback" not in result.err and "\ninterrupted\n" not in f"\n{result.err}"
    stopped, command = stop_message(result.err)
    last = out / "checkpoints" / "teacher" / "last.pt"
    if signals == 1:  # the next step (all ranks agree on the flag in a step) finishes, the state is saved mid-epoch
        assert stopped == f"stopped: interrupted by SIGINT in stage 'teacher', epoch 2, step 4/6; the state is saved in {last}"
    else:  # stopped at once: the state at the last save, the end of epoch 1
        assert stopped == f"stopped: interrupted by SIGINT twice: stopped at once in stage 'teacher', the end of epoch 1; the state is saved in {last}"
    assert command.endswith(f"run {recipe} --set train.batch_size=16 --output {out} --resume")

    monkeypatch.delenv("PYRAMIDKD_TEST_SIGNAL_AT")
    words = shlex.split(command)
    resumed = cli(*words[words.index("run"):])
    assert resumed.code == 0, resumed.err
    assert metrics(out) == metrics(reference)


def test_stop_flag_says_what_was_saved():
    flag = StopFlag("pyramidkd run r.toml --output o --resume")
    assert "no stage was training" in str(flag.interrupted(signal.SIGTERM))
    flag.enter_stage("s")
    assert "in stage 's'; nothing of it was saved yet" in str(flag.interrupted(signal.SIGTERM))
    flag.record_save(SavedPosition("o/checkpoints/s/last.pt", epoch=2, step=5, num_steps=9))
    flag.request(signal.SIGINT)
    assert flag.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt) as caught:  # not an Exception: no handler on the way swallows it
        flag.request(signal.SIGINT)
    error = caught.value.error
    assert error.exit_code == 130
    assert str(error) == ("interrupted by SIGINT twice: stopped at once in stage 's', epoch 3, step 5/9; the state is saved in "
                          "o/checkpoints/s/last.pt\n  fix: resume with: pyramidkd run r.toml --output o --resume")


def test_resume_command_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "venv" / "bin" / "pyramidkd"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    command = resume_command(str(tmp_path / "my recipes" / "r.toml"), str(tmp_path / "runs" / "a"), ["train.epochs=1", 'x.y="a b"'],
                             max_epochs=2, argv0=str(script))
    assert shlex.split(command) == ["venv/bin/pyramidkd", "run", "my recipes/r.toml", "--set", "train.epochs=1", "--set", 'x.y="a b"',
                                    "--max-epochs", "2", "--output", "runs/a", "--resume"]
    outside = resume_command("/elsewhere/r.toml", "/elsewhere/out", argv0=str(script))
    assert shlex.split(outside)[2] == "/elsewhere/r.toml"
    monkeypatch.chdir(script.parent)
    assert shlex.split(resume_command("r.toml", "o", argv0=str(script)))[0] == "./pyramidkd"  # a slash, or the shell searches PATH
    monkeypatch.setenv("PATH", str(script.parent))
    script.chmod(0o755)
    assert shlex.split(resume_command("r.toml", "o", argv0=str(script)))[0] == "pyramidkd"  # found on PATH: the bare name
    module = shlex.split(resume_command("r.toml", "o", argv0=str(ROOT / "package" / "__main__.py")))
    assert module[:3] == [sys.executable, "-m", "pyramidkd"]


def test_printed_resume_command_pastes_without_venv_on_path(recipe, tmp_path):
    """The README installs into .venv and never puts it on PATH: the command must
    work as pasted, from the folder the run was started in."""
    executable = ROOT / ".venv" / "bin" / "pyramidkd"
    if not executable.exists():
        pytest.skip("no .venv/bin/pyramidkd (not installed by scripts/setup.sh)")
    bare_path = "/usr/bin:/bin"
    out = tmp_path / "run"
    env = {**os.environ, "PATH": bare_path, "PYRAMIDKD_TEST_STEP_SLEEP": "0.02"}
    env.pop("PYRAMIDKD_TEST_SIGNAL_AT", None)
    process = subprocess.Popen([str(executable), "run", str(recipe), "--quiet", "--output", str(out)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "teacher" / "last.pt").exists():  # after the first epoch
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the run never saved its first epoch"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    _, command = stop_message(err)
    assert command.startswith(".venv/bin/pyramidkd run ")  # relative to the folder it ran in

    env.pop("PYRAMIDKD_TEST_STEP_SLEEP")
    pasted = subprocess.run(["/bin/bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert pasted.returncode == 0, pasted.stderr
    assert "resuming stage 'teacher'" in pasted.stderr
    assert (out / "summary.json").exists()
