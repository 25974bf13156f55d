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


# A loss with a trainable regressor built in setup(), as the FitNet hint loss has:
# each process saves its copy when it ends, so the test can compare the ranks'.
REGRESSOR_PLUGIN = """
import atexit, os
import torch
import torch.nn.functional as F
from torch import nn
from pyramidkd.engine import Loss, hookimpl

class RegressedCE(Loss):
    name = "regressed-ce"

    def setup(self, student, teachers):
        classes = student.logits.shape[1]
        self.regressor = nn.Linear(classes, classes)
        path = os.path.join(os.environ["REGRESSOR_DIR"], f"rank{os.environ.get('RANK', '0')}.pt")
        atexit.register(lambda: torch.save(self.regressor.state_dict(), path))

    def forward(self, student, teachers, targets):
        return F.cross_entropy(self.regressor(student.logits.float()), targets)

@hookimpl
def pyramidkd_register_losses():
    return [RegressedCE]
"""

REGRESSOR_RECIPE = DDP_RECIPE.replace('name = "ddp"', 'name = "ddp"\nplugins = ["regressor_loss"]').split("[[stages]]")[0] + """
[[stages]]
id = "student"
scheme = "scratch"
model = { name = "vgg", layers = [4, "M"], batch_norm = false, dropout = 0.0 }
loss = { name = "regressed-ce" }
"""


def torchrun(recipe, output, env: dict, nproc: int = 2):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "pyramidkd", "run", str(recipe), "--quiet", "--output", str(output)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300,
    )


def test_a_loss_with_trainable_parameters_is_all_reduced_like_the_student(tmp_path):
    """Issue 19 item 3: the loss's own parameters (a FitNet regressor) are trained by
    every rank on its share of the batch; unreduced, they drift apart per rank."""
    import torch

    (tmp_path / "regressor_loss.py").write_text(REGRESSOR_PLUGIN)
    recipe = tmp_path / "regressor.toml"
    recipe.write_text(REGRESSOR_RECIPE)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), ddp.mkdir()
    done = torchrun(recipe, tmp_path / "ddp-run", {"REGRESSOR_DIR": str(ddp)})
    assert done.returncode == 0, done.stdout + done.stderr
    first, second = (torch.load(ddp / f"rank{rank}.pt") for rank in (0, 1))
    assert first.keys() == second.keys() == {"weight", "bias"}
    for key in first:
        assert torch.equal(first[key], second[key]), f"regressor.{key} differs between the ranks"
    # ... and averaged as the student's gradients are: the single-process regressor
    alone = subprocess.run([sys.executable, "-m", "pyramidkd", "run", str(recipe), "--quiet", "--output", str(tmp_path / "single-run")],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "REGRESSOR_DIR": str(single)})
    assert alone.returncode == 0, alone.stderr
    reference = torch.load(single / "rank0.pt")
    for key in first:
        torch.testing.assert_close(first[key], reference[key], rtol=1e-4, atol=1e-5)


def test_a_batchnorm_model_on_gloo_runs_with_one_warning_about_sync_batchnorm(tmp_path):
    """PyTorch's SyncBatchNorm is CUDA-only: a CPU torchrun run of a BN model keeps
    per-rank statistics and says so once (train.sync_batchnorm defaults to true)."""
    recipe = tmp_path / "bn.toml"
    recipe.write_text(DDP_RECIPE.replace("batch_norm = false", "batch_norm = true").replace("epochs = 2", "epochs = 1"))
    done = torchrun(recipe, tmp_path / "ddp", {})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.count("train.sync_batchnorm = true, but PyTorch's SyncBatchNorm needs CUDA") == 1, done.stderr


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
def test_compile_switch(tmp_path, cli, monkeypatch):
    """``train.compile = true`` runs the student's and the teachers' forward through
    torch.compile, and the run trains through the compiled graphs."""
    import torch

    compiled = []
    real_compile = torch.compile

    def recording_compile(model, *args, **kwargs):
        compiled.append(type(model).__name__)
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    recipe = tmp_path / "r.toml"
    recipe.write_text(DDP_RECIPE)
    result = cli("run", recipe, "--quiet", "--output", tmp_path / "out", "--set", "train.epochs=1", "--set", "train.compile=true",
                 "--set", "dataset.train_size=64")
    assert result.code == 0, result.err
    # teacher stage: its student; student stage: its student and its one teacher
    assert len(compiled) == 3 and all(name != "function" for name in compiled), compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo captured and compiled the forward


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


# --- SyncBatchNorm (train.sync_batchnorm), checked without a GPU ---------------------


def bn_model():
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2))


def test_sync_batchnorm_converts_every_bn_layer_under_torchrun_on_cuda():
    import torch
    from torch import nn

    from pyramidkd.engine.distributed import World, sync_batchnorm

    model = bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = sync_batchnorm(model, World(rank=1, size=2, local_rank=1), torch.device("cuda", 1), True)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(nn.SyncBatchNorm) == 2 and nn.BatchNorm2d not in kinds and nn.BatchNorm1d not in kinds
    # same keys and values: its checkpoints load into the plain BN model (teachers, init_from, best)
    assert converted.state_dict().keys() == before.keys()
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in before.items())
    bn_model().load_state_dict(converted.state_dict())


@pytest.mark.parametrize("enabled, size, device", [(False, 2, "cuda"), (True, 1, "cuda"), (True, 1, "cpu")])
def test_sync_batchnorm_leaves_the_model_alone_when_off_or_in_one_process(enabled, size, device, caplog):
    import torch

    from pyramidkd.engine.distributed import World, sync_batchnorm

    model = bn_model()
    assert sync_batchnorm(model, World(size=size), torch.device(device), enabled) is model
    assert not caplog.records


def test_sync_batchnorm_on_gloo_keeps_per_rank_bn_with_one_warning(monkeypatch, caplog):
    """PyTorch's SyncBatchNorm refuses CPU tensors: a CPU torchrun run keeps its BN
    layers and says once what that means."""
    import torch
    from torch import nn

    from pyramidkd.engine import distributed
    from pyramidkd.engine.distributed import World, sync_batchnorm

    monkeypatch.setattr(distributed, "_warned", [])
    world = World(rank=0, size=2)
    for _ in range(3):  # stages
        model = bn_model()
        assert sync_batchnorm(model, world, torch.device("cpu"), True) is model
        assert nn.SyncBatchNorm not in [type(m) for m in model.modules()]
    warnings = [r.getMessage() for r in caplog.records if "sync_batchnorm" in r.getMessage()]
    assert len(warnings) == 1 and "needs CUDA" in warnings[0] and "sync_batchnorm = false" in warnings[0]
    no_bn = nn.Sequential(nn.Linear(2, 2))
    monkeypatch.setattr(distributed, "_warned", [])
    caplog.clear()
    assert sync_batchnorm(no_bn, world, torch.device("cpu"), True) is no_bn and not caplog.records  # nothing to say


def test_the_sync_batchnorm_key_is_validated_like_every_train_key(tmp_path):
    from conftest import TINY_RECIPE

    from pyramidkd.engine import RecipeError
    from pyramidkd.engine.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_text(TINY_RECIPE)
    assert load_recipe(str(path)).train.sync_batchnorm is True  # the default: DDP normalises as one process does
    assert load_recipe(str(path), ["train.sync_batchnorm=false"]).train.sync_batchnorm is False
    assert load_recipe(str(path), ["stages.student.train.sync_batchnorm=false"]).stages[1].train.sync_batchnorm is False
    with pytest.raises(RecipeError, match=r"train\.sync_batchnorm.*true or false"):
        load_recipe(str(path), ['train.sync_batchnorm="yes"'])
    path.write_text(TINY_RECIPE.replace("epochs = 2\n", "epochs = 2\nsync_batchnom = true\n", 1))
    with pytest.raises(RecipeError, match="did you mean 'sync_batchnorm'"):
        load_recipe(str(path))


# --- the process group's end and its barrier --------------------------------------------


def test_nccl_barrier_names_the_ranks_device_and_gloo_does_not(monkeypatch):
    from pyramidkd.engine import distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "barrier", lambda **kwargs: calls.append(kwargs))
    for backend in ("nccl", "gloo"):
        monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None, backend=backend: backend)
        distributed.barrier(distributed.World(rank=3, size=4, local_rank=1))
    distributed.barrier(distributed.World())  # one process: no collective at all
    assert calls == [{"device_ids": [1]}, {}]


def test_the_process_group_joined_is_destroyed_when_the_process_ends(monkeypatch):
    import atexit

    from pyramidkd.engine import distributed

    state = {"initialized": False, "destroyed": 0}
    exits = []

    def init_process_group(**kwargs):
        state["initialized"] = True

    def destroy_process_group():
        state["initialized"], state["destroyed"] = False, state["destroyed"] + 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: state["initialized"])
    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", destroy_process_group)
    monkeypatch.setattr(atexit, "register", exits.append)
    world = distributed.init_world(use_cuda=False)
    assert world == distributed.World(rank=1, size=2, local_rank=1) and state["initialized"]
    assert len(exits) == 1
    exits[0]()
    exits[0]()  # twice (an explicit close_world, then the exit handler): destroyed once
    assert state == {"initialized": False, "destroyed": 1}
