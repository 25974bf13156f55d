"""Data-parallel runs under torchrun (gloo on CPU) and the speed switches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

DDP_RECIPE = """
[experiment]
name = "ddp"
seed = 11
device = "cpu"

[dataset]
name = "synthetic"
num_classes = 4
image_size = 8
train_size = 200
val_size = 40
test_size = 40

[train]
epochs = 2
batch_size = 32
optimizer = { name = "sgd", lr = 0.05 }

[[stages]]
id = "teacher"
scheme = "scratch"
model = { name = "vgg", layers = [8, "M", 16, "M"], batch_norm = false, dropout = 0.0 }

[[stages]]
id = "student"
scheme = { name = "kd", teacher = "teacher" }
model = { name = "vgg", layers = [4, "M"], batch_norm = false, dropout = 0.0 }
loss = { name = "kd", temperature = 2.0, alpha = 0.7 }
"""


def epoch_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# The same two stages on real digits with random crops and flips (test_tensor_pipeline's
# `digits-u8` plugin) on the tensor path: each global batch's augmentation is drawn
# from the stage's generator, so the ranks' shares are those of the single run.
AUGMENTED_RECIPE = DDP_RECIPE.replace('name = "ddp"', 'name = "ddp"\nplugins = ["tensor_helpers"]').replace(
    """name = "synthetic"
num_classes = 4
image_size = 8
train_size = 200
val_size = 40
test_size = 40""", """name = "digits-u8"
image_size = 12""").replace("epochs = 2", 'epochs = 1\npipeline = "tensor"')


def test_two_process_gloo_run_matches_single_process(tmp_path, cli):
    recipe = tmp_path / "ddp.toml"
    recipe.write_text(DDP_RECIPE)
    two_process_run_matches_single_process(recipe, tmp_path, cli, "data: tensor pipeline (synthetic offers decoded tensors")


def test_two_process_gloo_run_matches_single_process_with_augmented_tensors(tmp_path, cli):
    from test_tensor_pipeline import HELPERS

    (tmp_path / "tensor_helpers.py").write_text(HELPERS)
    recipe = tmp_path / "augmented.toml"
    recipe.write_text(AUGMENTED_RECIPE)
    try:
        two_process_run_matches_single_process(recipe, tmp_path, cli, 'data: tensor pipeline (pipeline = "tensor"; digits-u8')
    finally:
        sys.modules.pop("tensor_helpers", None)


def two_process_run_matches_single_process(recipe, tmp_path, cli, data_line: str):
    single = tmp_path / "single"
    result = cli("run", recipe, "--quiet", "--output", single)
    assert result.code == 0, result.err
    assert data_line in result.err

    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pyramidkd", "run", str(recipe), "--quiet", "--output", str(ddp)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((ddp / "manifest.json").read_text())["world_size"] == 2

    # Same global batches, loss weighted by each rank's share: the runs agree up to
    # float summation order. Stated tolerance: 1e-4 on losses, exact accuracies.
    left, right = epoch_records(single), epoch_records(ddp)
    assert [(r["stage"], r["kind"], r["epoch"]) for r in left] == [(r["stage"], r["kind"], r["epoch"]) for r in right]
    for a, b in zip(left, right):
        for key in ("train_loss", "val_loss", "test_loss"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["stage"], key)
        for key in ("train_acc", "val_acc", "test_acc"):
            if a.get(key) is not None:
                assert b[key] == a[key], (a["stage"], key)
    # only rank 0 wrote: one line per record, one summary
    assert len(right) == len(left)


@pytest.mark.parametrize("switches", [
    ["train.precision=\"bf16\"", "train.channels_last=true"],
    ["train.precision=\"fp16\""],
])
def test_speed_switches_run_end_to_end(switches, tmp_path, cli):
    recipe = tmp_path / "r.toml"
    recipe.write_text(DDP_RECIPE)
    args = ["run", recipe, "--quiet", "--output", tmp_path / "out", "--set", "train.epochs=1"]
    for switch in switches:
        args += ["--set", switch]
    result = cli(*args)
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert all(0 <= s["test_acc"] <= 1 for s in summary["stages"])
    state = __import__("torch").load(tmp_path / "out" / "checkpoints" / "teacher" / "last.pt", weights_only=False)
    assert state["grad_scaler"] is not None


@pytest.mark.slow  # inductor compiles each graph on 2 cores: about a minute
def test_compile_switch(tmp_path, cli):
    recipe = tmp_path / "r.toml"
    recipe.write_text(DDP_RECIPE)
    result = cli("run", recipe, "--quiet", "--output", tmp_path / "out", "--set", "train.epochs=1", "--set", "train.compile=true",
                 "--set", "dataset.train_size=64")
    assert result.code == 0, result.err


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_switch_sets_torch_for_the_run_and_restores_it(deterministic, tmp_path):
    import torch

    from pyramidkd import testing

    seen = {}

    def capture(run, stage):
        seen[stage.id] = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                          torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                          torch.get_float32_matmul_precision())

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
              torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    plugin = testing.plugin_module("capture", pyramidkd_stage_start=capture)
    testing.run_tiny(overrides=[f"experiment.deterministic={str(deterministic).lower()}"], extra_plugins=[plugin])
    expected = (True, before[1], before[2], before[3], before[4]) if deterministic else (False, True, True, True, "high")
    assert seen["teacher"] == seen["student"] == expected
    after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    assert after == before
