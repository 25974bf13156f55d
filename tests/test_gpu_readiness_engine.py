"""Engine fixes for the first CUDA run (issue 19, items 1, 4, 5, 8 and 9), tested
without a GPU: devices compared as PyTorch compares them and a fake CUDA device
(FakeTensorMode), gloo DDP, PyTorch's determinism switches, a data set with a bad
label, and counted host-device sync points and collectives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import recipe_with_plugin
from pyramidkd import testing
from pyramidkd.engine import Augmentation, TensorSplit
from pyramidkd.engine.data.batches import TensorBatches
from pyramidkd.engine.distributed import World

# A test-only plugin: a data set with one out-of-range label in a chosen split (on
# both data paths), and a loss that fails like an op without a deterministic kernel.
HELPERS = '''
import attrs, torch, torch.nn.functional as F
from pyramidkd.engine import DataSplits, Dataset, Loss, TensorSplit, hookimpl

@attrs.define
class BadParams:
    bad_split: str = "val"
    bad_label: int = 4

class BadLabels(Dataset):
    name = "bad-labels"
    Params = BadParams
    def splits(self, make):
        generator = torch.Generator().manual_seed(0)
        parts = []
        for split, size in (("train", 32), ("val", 16), ("test", 16)):
            labels = torch.randint(0, 4, (size,), generator=generator)
            if split == self.params.bad_split:
                labels[5] = self.params.bad_label
            parts.append(make(torch.randn(size, 3, 8, 8, generator=generator), labels))
        return DataSplits(*parts, 4, (3, 8, 8), ["a", "b", "c", "d"])
    def load(self, context):
        return self.splits(torch.utils.data.TensorDataset)
    def load_tensors(self, context):
        return self.splits(TensorSplit)

class NoDeterministicKernel(Loss):
    name = "no-deterministic-kernel"
    def forward(self, student, teachers, targets):
        raise RuntimeError("upsample_bilinear2d_backward_out_cuda does not have a deterministic implementation, but you "
                           "set 'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this "
                           "operation, or you can use the 'warn_only=True' option, if that's acceptable for your application.")

@attrs.define
class NanParams:
    step: int = 5

class NanOnRankOne(Loss):
    """Cross-entropy, NaN at one step on rank 1 only (the other ranks' losses are finite)."""
    name = "nan-on-rank-one"
    Params = NanParams
    def __init__(self, params=None):
        super().__init__(params)
        self.calls = 0
    def forward(self, student, teachers, targets):
        self.calls += 1
        loss = F.cross_entropy(student.logits, targets)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return loss * float("nan") if self.calls == self.params.step and rank == 1 else loss

@hookimpl
def pyramidkd_register_datasets():
    return [BadLabels]

@hookimpl
def pyramidkd_register_losses():
    return [NoDeterministicKernel, NanOnRankOne]
'''


@pytest.fixture
def helpers(tmp_path):
    with recipe_with_plugin(tmp_path, "gpu_ready_helpers", HELPERS) as folder:
        yield folder


def helper_recipe(folder, **parts) -> str:
    text = testing.tiny_recipe(teacher=False, **parts).replace('device = "cpu"', 'device = "cpu"\nplugins = ["gpu_ready_helpers"]')
    path = folder / "recipe.toml"
    path.write_text(text)
    return str(path)


# --- 1: devices resolved to an index; only CPU tensors pinned ----------------------


def test_cuda_is_resolved_to_the_current_device_or_the_local_rank():
    from pyramidkd.engine.runner import choose_device

    recipe = types.SimpleNamespace(experiment=types.SimpleNamespace(device="cuda"), file="r.toml")
    with mock.patch("torch.cuda.is_available", return_value=True), mock.patch("torch.cuda.current_device", return_value=1):
        assert choose_device(recipe) == torch.device("cuda", 1)  # tensors report cuda:1; torch.device("cuda") != it
        assert choose_device(recipe, World(rank=2, size=4, local_rank=0)) == torch.device("cuda", 0)
        recipe.experiment.device = "auto"
        assert choose_device(recipe).index == 1
    recipe.experiment.device = "cpu"
    assert choose_device(recipe) == torch.device("cpu")


@pytest.mark.parametrize("held_on", ["cpu", "cuda:0"])
def test_tensor_batches_on_a_fake_gpu_pin_only_cpu_tensors_and_copy_without_blocking(held_on):
    """The quickstart's tensor path on a ("fake") GPU given as plain ``cuda``: pinning a
    GPU tensor raises on a real one, and a blocking copy per batch waits for the device."""
    pinned, blocking = [], []
    real_to = torch.Tensor.to

    def pin_memory(self, *args, **kwargs):
        pinned.append(self.device)
        return self

    def to(self, *args, **kwargs):
        target = args[0] if args and isinstance(args[0], (torch.device, str)) else kwargs.get("device")
        if target is not None and torch.device(target).type == "cuda" and self.device.type == "cpu" and not kwargs.get("non_blocking"):
            blocking.append(tuple(self.shape))
        return real_to(self, *args, **kwargs)

    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(10) % 4
    with mock.patch("torch.cuda.current_device", return_value=0), FakeTensorMode(allow_non_fake_inputs=True):
        split = TensorSplit(images.to(held_on), labels.to(held_on), mean=(0.5,) * 3, std=(0.25,) * 3)
        train = TensorBatches(split, 4, World(), torch.device("cuda"), generator=torch.Generator().manual_seed(0),
                              augmentation=Augmentation(crop_padding=2, flip=True))
        evaluation = TensorBatches(split, 4, World(), "cuda")
        with mock.patch.object(torch.Tensor, "pin_memory", pin_memory), mock.patch.object(torch.Tensor, "to", to):
            batches = train.epoch()  # the epoch's draws (and their one copy) happen here
            blocking.clear()
            batches = list(batches) + list(evaluation)
    assert all(x.device == torch.device("cuda", 0) and y.device == torch.device("cuda", 0) for x, y in batches)
    assert all(device.type == "cpu" for device in pinned), pinned
    assert len(pinned) == (2 * len(batches) if held_on == "cpu" else 0)  # images and labels, each batch
    assert blocking == []  # no per-batch blocking host-to-device copy (the order used to be one)


# --- 4: the stage's own loss evaluates the unwrapped student under DDP ----------------

STAGE_LOSS_WORKER = '''
import datetime, json, sys, types
import torch, torch.distributed as dist
from torch import nn
from pyramidkd.engine import TensorSplit
from pyramidkd.engine.data.batches import TensorBatches
from pyramidkd.engine.distributed import World
from pyramidkd.engine.training.evaluate import stage_loss
from pyramidkd.engine.training.taps import TapRecorder

rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
ddp = nn.parallel.DistributedDataParallel(model)
ddp(torch.randn(4, 3, 8, 8)).sum().backward()  # a training step: DDP's next forward broadcasts the BN buffers
calls = []
tap = TapRecorder(model, {"hint": "1"}, role="student", stage_id="s", forward=lambda x: calls.append(1) or ddp(x))

class OwnLoss(nn.Module):  # uses a tap, like a hint stage
    def forward(self, student, teachers, targets):
        return nn.functional.cross_entropy(student.logits, targets) + 0 * student.features["hint"].mean()

state = types.SimpleNamespace(student=model, loss_fn=OwnLoss(), student_tap=tap, teacher_outputs=lambda images: [],
                              prepare_images=lambda images: images)
generator = torch.Generator().manual_seed(1)
split = TensorSplit(torch.randn(3, 3, 8, 8, generator=generator), torch.tensor([0, 1, 2]))
# 3 images, batches of 1: rank 0 evaluates 2 batches, rank 1 one (a DDP forward per batch would not match)
loss = stage_loss(state, TensorBatches(split, 1, World(rank, 2, rank), "cpu"), torch.device("cpu"), precision="fp32",
                  world=World(rank, 2, rank))
model.eval()
with torch.no_grad():
    expected = nn.functional.cross_entropy(model(split.images), split.labels).item()
json.dump({"loss": loss, "expected": expected, "ddp_forwards": len(calls)}, open(out, "w"))
dist.destroy_process_group()
'''


def run_two_ranks(tmp_path, script: str, *args: str, timeout: int = 240) -> list[dict]:
    path = tmp_path / "worker.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, str(path), str(rank), str(tmp_path / "init"), str(tmp_path / f"rank{rank}.json"), *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
                 for rank in range(2)]
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_stage_loss_under_ddp_runs_the_unwrapped_student(tmp_path):
    results = run_two_ranks(tmp_path, STAGE_LOSS_WORKER)
    assert [r["ddp_forwards"] for r in results] == [0, 0]  # no collective per batch
    for result in results:  # the mean over both ranks' shards
        assert result["loss"] == pytest.approx(result["expected"], rel=1e-5)


# --- 5: deterministic mode is strict, and gram/hint pool deterministically -----------


def test_deterministic_mode_is_strict_and_restored():
    seen = {}

    def capture(run, stage):
        seen[stage.id] = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                          torch.utils.deterministic.fill_uninitialized_memory)

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    testing.run_tiny(testing.tiny_recipe(teacher=False), extra_plugins=[testing.plugin_module("capture", pyramidkd_stage_start=capture)])
    assert seen["student"] == (True, False, False)  # strict (no warn_only), no extra pass over each allocation
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory) == before


def test_an_op_without_a_deterministic_kernel_is_a_clear_error(helpers, cli):
    recipe = helper_recipe(helpers, loss="no-deterministic-kernel")
    result = cli("run", recipe, "--quiet", "--output", helpers / "run")
    assert result.code == 1, result.err
    assert "Traceback" not in result.err
    assert "experiment.deterministic: deterministic = true, but upsample_bilinear2d_backward_out_cuda has no deterministic" in result.err
    assert "fix: set deterministic = false" in result.err


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_gram_and_hint_pool_without_adaptive_pooling(pool, monkeypatch):
    """adaptive_{avg,max}_pool2d have non-deterministic CUDA backwards; the sizes
    divide in every built-in scheme, where plain pooling gives the very same values."""
    from pyramidkd.engine import ModelOutput
    from pyramidkd.plugins.losses.features import HintLoss, HintParams, _pool_to, gram_matrix

    generator = torch.Generator().manual_seed(0)
    f_in, f_out = torch.randn(2, 3, 16, 16, generator=generator), torch.randn(2, 5, 4, 8, generator=generator)
    adaptive = F.adaptive_max_pool2d if pool == "max" else F.adaptive_avg_pool2d
    expected_gram = torch.bmm(adaptive(f_in, (4, 8)).flatten(2), f_out.flatten(2).transpose(1, 2)) / 32
    odd = torch.randn(2, 3, 7, 9, generator=generator)
    expected_odd = adaptive(odd, (3, 4))
    student, teacher = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    expected_hint = F.mse_loss(F.adaptive_avg_pool2d(student, (4, 4)), teacher)

    def refused(*args, **kwargs):
        raise AssertionError("adaptive pooling called")

    monkeypatch.setattr(F, "adaptive_avg_pool2d", refused)
    monkeypatch.setattr(F, "adaptive_max_pool2d", refused)
    assert torch.equal(gram_matrix(f_in, f_out, pool), expected_gram)
    assert torch.allclose(_pool_to(odd, (3, 4), pool), expected_odd, atol=1e-6)  # sizes that do not divide: same windows
    loss = HintLoss(HintParams(regressor="never", hint_layer="hint"))
    loss.setup(ModelOutput(student, {"hint": student}), [ModelOutput(teacher, {"hint": teacher})])
    assert torch.equal(loss(ModelOutput(student, {"hint": student}), [ModelOutput(teacher, {"hint": teacher})], None), expected_hint)


# --- 8: labels checked when the data is loaded, on both data paths --------------------


@pytest.mark.parametrize("pipeline", ["tensor", "dataloader"])
@pytest.mark.parametrize("bad", [("val", 4), ("train", -1)])
def test_an_out_of_range_label_is_a_clear_error_before_training(pipeline, bad, helpers, cli):
    split, label = bad
    recipe = helper_recipe(helpers, dataset={"name": "bad-labels", "bad_split": split, "bad_label": label})
    out = helpers / "run"
    result = cli("run", recipe, "--quiet", "--output", out, "--set", f'train.pipeline="{pipeline}"')
    assert result.code == 1, result.err
    assert "Traceback" not in result.err
    assert (f"dataset: dataset 'bad-labels': 1 label(s) of the {split} split are outside 0..3 (4 classes), "
            f"e.g. sample 5 has label {label}") in result.err
    assert "fix: correct the labels" in result.err
    assert not (out / "checkpoints" / "student" / "last.pt").exists()  # refused before training


def test_labels_are_read_without_decoding_images():
    from pyramidkd.engine.data.pipeline import split_labels

    labels = torch.tensor([3, 1, 2, 0])
    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 1), labels)
    assert torch.equal(split_labels(torch.utils.data.Subset(dataset, [2, 0])), torch.tensor([2, 3]))
    assert torch.equal(split_labels(types.SimpleNamespace(targets=[1, 2])), torch.tensor([1, 2]))
    assert split_labels(types.SimpleNamespace()) is None


# --- 9: host-device syncs and collectives per step ------------------------------------


SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")


def count_syncs(monkeypatch) -> dict[str, int]:
    """Count the tensor-to-host reads (each one waits for the device on a GPU)."""
    counts = dict.fromkeys(SYNC_METHODS, 0)
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_training_steps_do_not_read_the_device_every_step(monkeypatch):
    from pyramidkd.engine.training import stops

    dataset = {**testing.TINY_DATASET, "train_size": 512}  # 64 steps of 8 per epoch
    recipe = testing.tiny_recipe(teacher=False, dataset=dataset, epochs=2, student_model={"name": "vgg", "layers": [4, "M"]})
    steps = 2 * 512 // 8
    per_step = []

    def batch_end(run, stage, epoch, step, num_steps, loss):
        per_step.append(sum(counts.values()))

    counts = count_syncs(monkeypatch)
    summary = testing.run_tiny(recipe, overrides=["train.batch_size=8", "train.on_nan=\"stop\""],
                               extra_plugins=[testing.plugin_module("count", pyramidkd_batch_end=batch_end)])
    assert summary["stages"][0]["test_acc"] >= 0
    reads_during_steps = per_step[-1] - per_step[0]
    # one read every CHECK_EVERY steps, plus the epoch's end (was: at least one per step)
    assert reads_during_steps <= 2 * (steps // getattr(stops, "CHECK_EVERY", 16) + 2), (reads_during_steps, steps)


def test_deferred_nan_check_names_the_step_and_saves_no_nan_weights(tmp_path, cli):
    """on_nan = "stop" reads the check every CHECK_EVERY steps yet names the step of the
    first non-finite loss, keeps the last good checkpoint and never saves NaN weights."""
    from test_resume import HELPER_PLUGIN, RECIPE

    with recipe_with_plugin(tmp_path, "resume_helpers", HELPER_PLUGIN, RECIPE) as recipe:
        out = tmp_path / "stop"
        # step 27 = epoch 2, step 3 of 24: the check reads at step 16 of epoch 2
        result = cli("run", recipe, "--quiet", "--output", out, "--set", 'stages.teacher.loss={name = "nan-at", step = 27}')
        assert result.code == 1
        assert "stage 'teacher', epoch 2, step 3: the loss is nan; training stopped (found by the check at step 16" in result.err
        last = torch.load(out / "checkpoints" / "teacher" / "last.pt", weights_only=False)
        assert last["epoch"] == 1 and all(torch.isfinite(t).all() for t in last["state_dict"].values())


DDP_COUNT_WORKER = '''
import json, os, sys
import torch.distributed as dist
rank, init, out, recipe, run_dir = sys.argv[1:6]
os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[6])
calls = []
original = dist.all_reduce
dist.all_reduce = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
from pyramidkd.engine.runner import run_recipe
from pyramidkd.engine.training.stops import TrainingError
try:
    run_recipe(recipe, output=run_dir, quiet=True)
    outcome = "finished"
except TrainingError as error:
    outcome = str(error)
json.dump({"all_reduce": len(calls), "outcome": outcome}, open(out, "w"))
'''


def run_ddp(tmp_path, **recipe_parts) -> list[dict]:
    import socket

    dataset = {**testing.TINY_DATASET, "train_size": 512}  # 64 steps of 8
    recipe = helper_recipe(tmp_path, dataset=dataset, **recipe_parts)
    with open(recipe) as handle:
        text = handle.read().replace("batch_size = 32", "batch_size = 8")
    with open(recipe, "w") as handle:
        handle.write(text)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return run_two_ranks(tmp_path, DDP_COUNT_WORKER, recipe, str(tmp_path / "run"), str(port))


def test_ddp_ranks_agree_on_checks_every_few_steps_not_every_step(helpers):
    from pyramidkd.engine.training import stops

    results = run_ddp(helpers)
    steps = 512 // 8
    assert [r["outcome"] for r in results] == ["finished", "finished"]
    # the checks, the epoch's sums, validation and test (was: one per step and more)
    assert results[0]["all_reduce"] == results[1]["all_reduce"] <= steps // getattr(stops, "CHECK_EVERY", 16) + 6, results


def test_ddp_ranks_stop_alike_on_a_nan_on_one_rank_and_save_nothing(helpers):
    results = run_ddp(helpers, loss="nan-on-rank-one", loss_params={"step": 5})
    rank0, rank1 = (r["outcome"] for r in results)
    assert rank1.startswith("stage 'student', epoch 1, step 5: the loss is nan; training stopped (found by the check at step 16")
    # rank 0's own loss turns NaN a step later (DDP averaged rank 1's NaN gradients into its weights)
    assert rank0.startswith("stage 'student', epoch 1, step 6: the loss is nan; training stopped (found by the check at step 16")
    assert not (helpers / "run" / "checkpoints" / "student" / "last.pt").exists()
