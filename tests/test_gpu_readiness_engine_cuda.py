"""Issue 19's engine fixes (items 1, 5, 9) where they matter, on a GPU: skipped
without one (tests/test_gpu_readiness_engine.py shows them on the CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from pyramidkd import testing

pytestmark = pytest.mark.cuda  # part of the GPU check's test matrix (pytest -m cuda)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Hint (fitnet) and gram stages on the tensor path: adaptive pooling's backward,
# DDP-free stage_loss selection (select = "val_loss"), the pinned/indexed data path.
GPU_RECIPE = """
[experiment]
name = "gpu-ready"
seed = 0
device = "cuda"
deterministic = true

[dataset]
name = "synthetic"
num_classes = 4
image_size = 32
train_size = 256
val_size = 64
test_size = 64

[train]
epochs = 2
batch_size = 8
pipeline = "tensor"
optimizer = { name = "sgd", lr = 0.02 }

[[stages]]
id = "teacher"
scheme = "scratch"
model = { name = "vgg19", width = 0.0625, batch_norm = true }

[[stages]]
id = "fit"
scheme = { name = "fitnet", teacher = "teacher", width = 0.0625, batch_norm = true, levels = ["svgg5"] }

[[stages]]
id = "gram"
scheme = { name = "gram-direct", teacher = "teacher", width = 0.0625, batch_norm = true, levels = ["svgg8"] }
"""


@CUDA
def test_on_cuda_deterministic_hint_and_gram_stages_repeat_exactly(tmp_path, cli):
    recipe = tmp_path / "gpu.toml"
    recipe.write_text(GPU_RECIPE)
    runs = []
    for name in ("a", "b"):
        result = cli("run", recipe, "--quiet", "--output", tmp_path / name)
        assert result.code == 0, result.err
        runs.append([{k: v for k, v in json.loads(line).items() if not k.endswith("time_s")}
                     for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert runs[0] == runs[1]
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["device"] == f"cuda:{torch.cuda.current_device()}"


@CUDA
def test_on_cuda_training_steps_sync_only_at_the_checks(tmp_path):
    """``torch.cuda.set_sync_debug_mode("warn")`` warns at every synchronising call;
    steps between two checks must have none."""
    import warnings

    from pyramidkd.engine.training import stops

    seen = []

    def batch_end(run, stage, epoch, step, num_steps, loss):
        seen.append((stage.id, step, num_steps, len(caught)))

    recipe = testing.tiny_recipe(teacher=False, dataset={**testing.TINY_DATASET, "train_size": 512}).replace('device = "cpu"', 'device = "cuda"')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            testing.run_tiny(recipe, overrides=["train.batch_size=8", 'train.pipeline="tensor"'],
                             extra_plugins=[testing.plugin_module("count", pyramidkd_batch_end=batch_end)])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncing = [step for (_, step, steps, count), (_, _, _, before) in zip(seen[1:], seen) if count > before]
    checks = [step for _, step, steps, _ in seen[1:] if step % stops.CHECK_EVERY == 0 or step == steps or step == 1]
    assert set(syncing) <= set(checks), (syncing, checks)
