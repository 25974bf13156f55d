"""Never lose a run: kill-and-resume equality, signals, locks, corrupt files,
NaN losses, failing plugins, changed recipes, full disks."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import recipe_with_plugin
from pyramidkd.engine.rundir import RunDirectory
from pyramidkd.engine.training.checkpoints import load_checkpoint

TIMING_KEYS = {"epoch_time_s", "train_time_s", "time_s"}

# A test-only plugin: slows every step a little, so a kill lands mid-epoch; when
# PYRAMIDKD_TEST_RAISE_AT_EPOCH is set its epoch_end hook raises; its `nan-at`
# loss returns NaN at one global step.
HELPER_PLUGIN = '''
import os, time
import attrs, torch.nn.functional as F
from pyramidkd.engine import Loss, hookimpl

@hookimpl
def pyramidkd_batch_end(run, stage, epoch, step, num_steps, loss):
    time.sleep(float(os.environ.get("PYRAMIDKD_TEST_STEP_SLEEP", "0")))

@hookimpl
def pyramidkd_epoch_end(run, stage, epoch, metrics):
    if str(epoch) == os.environ.get("PYRAMIDKD_TEST_RAISE_AT_EPOCH"):
        raise ValueError("exploded on purpose")

@attrs.define
class NanParams:
    step: int = 3

class NanAt(Loss):
    """Cross-entropy, but NaN at one step (counted over the whole stage)."""
    name = "nan-at"
    Params = NanParams
    def __init__(self, params=None):
        super().__init__(params)
        self.calls = 0
    def forward(self, student, teachers, targets):
        self.calls += 1
        loss = F.cross_entropy(student.logits, targets)
        return loss * float("nan") if self.calls == self.params.step else loss

@hookimpl
def pyramidkd_register_losses():
    return [NanAt]
'''

RECIPE = """
[experiment]
name = "resumable"
seed = 5
device = "cpu"
plugins = ["resume_helpers"]

[dataset]
name = "synthetic"
num_classes = 4
image_size = 8
train_size = 384
val_size = 32
test_size = 32

[train]
epochs = 3
batch_size = 16
optimizer = { name = "sgd", lr = 0.05 }

[[stages]]
id = "teacher"
scheme = "scratch"
model = { name = "vgg", layers = [8, "M", 16, "M"] }

[[stages]]
id = "student"
scheme = { name = "kd", teacher = "teacher" }
model = { name = "vgg", layers = [4, "M"], dropout = 0.3 }
loss = { name = "kd", temperature = 2.0, alpha = 0.7 }
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    with recipe_with_plugin(tmp_path_factory.mktemp("resume"), "resume_helpers", HELPER_PLUGIN, RECIPE) as path:
        yield path


def metrics(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def weights(run_dir, stage, which="best"):
    return load_checkpoint(str(run_dir / "checkpoints" / stage / f"{which}.pt"))["state_dict"]


def assert_same_run(a, b):
    assert metrics(a) == metrics(b)
    for stage in ("teacher", "student"):
        left, right = weights(a, stage), weights(b, stage)
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), stage
    summary_a = json.loads((a / "summary.json").read_text())
    summary_b = json.loads((b / "summary.json").read_text())
    assert [s["test_acc"] for s in summary_a["stages"]] == [s["test_acc"] for s in summary_b["stages"]]


@pytest.fixture(scope="module")
def reference_run(recipe, tmp_path_factory):
    from pyramidkd.engine.cli import main

    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", str(recipe), "--quiet", "--output", str(out)]) == 0
    return out


@pytest.fixture
def reference(reference_run, tmp_path):
    """A private copy of the uninterrupted run (some tests change it)."""
    import shutil

    copy = tmp_path / "reference"
    shutil.copytree(reference_run, copy)
    return copy


def start(recipe, out, **env):
    environment = {**os.environ, "PYRAMIDKD_TEST_STEP_SLEEP": "0.01", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "pyramidkd", "run", str(recipe), "--quiet", "--output", str(out)],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("where", ["mid-epoch", "mid-chain"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(where, recipe, reference, tmp_path, cli):
    out = tmp_path / "killed"
    process = start(recipe, out)
    stage = "teacher" if where == "mid-epoch" else "student"
    wait_for(out / "checkpoints" / stage / "last.pt", process)
    time.sleep(random.Random(where).uniform(0.05, 0.4))  # somewhere inside a later epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists(), "the run finished before the kill; make it slower"

    resumed = cli("run", recipe, "--quiet", "--output", out, "--resume")
    assert resumed.code == 0, resumed.err
    assert_same_run(reference, out)


def test_sigterm_saves_mid_epoch_and_resume_is_exact(recipe, reference, tmp_path, cli):
    out = tmp_path / "terminated"
    process = start(recipe, out)
    wait_for(out / "checkpoints" / "teacher" / "last.pt", process)
    time.sleep(0.15)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    state = load_checkpoint(str(out / "checkpoints" / "teacher" / "last.pt"))
    assert state["progress"]["step"] > 0  # saved inside the epoch, not at its start

    resumed = cli("run", recipe, "--quiet", "--output", out, "--resume")
    assert resumed.code == 0, resumed.err
    step = state["progress"]["step"]
    assert (f"resuming stage 'teacher' from epoch {state['epoch'] + 1}, step {step + 1} "
            f"(epoch {state['epoch'] + 1} was interrupted after step {step}); reused stages: none") in resumed.err
    assert_same_run(reference, out)


def test_resume_with_a_changed_recipe_is_refused_with_a_diff(recipe, reference, cli):
    result = cli("run", recipe, "--quiet", "--output", reference, "--resume", "--set", "train.epochs=4")
    assert result.code == 1
    assert "differs from the one this run was started with" in result.err
    assert "-epochs = 3" in result.err and "+epochs = 4" in result.err
    forced = cli("run", recipe, "--quiet", "--output", reference, "--resume", "--force", "--set", "train.epochs=4")
    assert forced.code == 0, forced.err
    assert "epochs = 4" in (reference / "recipe.toml").read_text()


def test_resume_needs_an_existing_run(recipe, tmp_path, cli):
    result = cli("run", recipe, "--quiet", "--output", tmp_path / "nothing", "--resume")
    assert result.code == 1 and "no run to resume" in result.err


def test_corrupted_and_truncated_checkpoints_are_named(recipe, reference, tmp_path, cli):
    last = reference / "checkpoints" / "student" / "last.pt"
    (reference / "checkpoints" / "student" / "result.json").unlink()  # make the student unfinished
    last.write_bytes(last.read_bytes()[: 200])
    result = cli("run", recipe, "--quiet", "--output", reference, "--resume")
    assert result.code == 1
    assert str(last) in result.err and "corrupt or truncated" in result.err and "Traceback" not in result.err

    teacher = reference / "checkpoints" / "teacher" / "best.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(teacher.read_bytes()[:-100])
    text = RECIPE.replace('teacher = "teacher"', f'teacher = "{truncated}"')
    (tmp_path / "from_truncated.toml").write_text(text)
    result = cli("run", tmp_path / "from_truncated.toml", "--quiet", "--output", tmp_path / "t2")
    assert result.code == 1 and "truncated.pt" in result.err and "corrupt or truncated" in result.err


def test_a_locked_folder_is_refused_and_a_stale_lock_taken_over(recipe, tmp_path, cli):
    out = tmp_path / "locked"
    with RunDirectory(str(out)).lock():
        result = cli("run", recipe, "--quiet", "--output", out)
    assert result.code == 1 and "another run is writing this folder" in result.err
    assert f"pid {os.getpid()}" in result.err

    # a lock file left by a process that died (no flock held) is taken over
    (out / ".lock").write_text("pid 999999 on elsewhere")
    result = cli("run", recipe, "--quiet", "--output", out, "--set", "train.epochs=1")
    assert result.code == 0, result.err
    assert "stale lock" in result.err


@pytest.mark.parametrize("mode", ["stop", "skip-batch"])
def test_nan_loss(mode, recipe, tmp_path, cli):
    out = tmp_path / mode
    args = ["run", recipe, "--quiet", "--output", out, "--set", f"train.on_nan={mode}",
            "--set", 'stages.teacher.loss={name = "nan-at", step = 30}']  # epoch 2, step 6 (24 steps per epoch)
    result = cli(*args)
    if mode == "stop":
        assert result.code == 1
        assert "stage 'teacher', epoch 2, step 6: the loss is nan" in result.err
        assert load_checkpoint(str(out / "checkpoints" / "teacher" / "last.pt"))["epoch"] == 1  # last good epoch kept
    else:
        assert result.code == 0, result.err
        skipped = [r["skipped_batches"] for r in metrics(out) if r["stage"] == "teacher" and r["kind"] == "epoch"]
        assert skipped == [0, 1, 0]
        assert all(torch.isfinite(t).all() for t in weights(out, "teacher").values())


def test_plugin_raising_in_a_hook_is_named_and_the_state_saved(recipe, reference, tmp_path, cli, monkeypatch):
    out = tmp_path / "raising"
    monkeypatch.setenv("PYRAMIDKD_TEST_RAISE_AT_EPOCH", "2")
    result = cli("run", recipe, "--quiet", "--output", out)
    assert result.code == 1
    assert "plugin 'resume_helpers' raised in pyramidkd_epoch_end: ValueError: exploded on purpose" in result.err
    assert load_checkpoint(str(out / "checkpoints" / "teacher" / "last.pt"))["epoch"] == 2
    monkeypatch.delenv("PYRAMIDKD_TEST_RAISE_AT_EPOCH")
    resumed = cli("run", recipe, "--quiet", "--output", out, "--resume")
    assert resumed.code == 0, resumed.err
    assert_same_run(reference, out)


def test_disk_full_leaves_the_previous_last_checkpoint(recipe, tmp_path, cli, monkeypatch):
    from pyramidkd.engine import rundir

    out = tmp_path / "full"
    real_write, calls = rundir._write_all, {"n": 0}

    def failing_write(handle, payload):
        calls["n"] += 1
        if calls["n"] > 6:  # after a few files: recipe, manifest, best and last of epoch 1...
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(handle, payload)

    monkeypatch.setattr(rundir, "_write_all", failing_write)
    result = cli("run", recipe, "--quiet", "--output", out)
    assert result.code == 1
    assert "the disk is full" in result.err and "Traceback" not in result.err
    assert not list(out.rglob("*.tmp"))
    last = load_checkpoint(str(out / "checkpoints" / "teacher" / "last.pt"))  # still a valid file
    assert last["epoch"] >= 1


def test_unwritable_output_is_a_clear_error(recipe, tmp_path, cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = cli("run", recipe, "--quiet", "--output", blocker / "run")
    assert result.code == 1 and "a-file" in result.err and "Traceback" not in result.err
