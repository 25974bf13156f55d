"""End to end: the method-zoo losses with trainable modules (``cc``, ``vid``, ``ofd``,
``reviewkd``) train in a real run on ``digits``, in the kd scheme, which taps what each
loss declares (``student_taps()`` / ``teacher_taps()``) through the models'
``tap_points()``; their modules are built in ``setup``, trained with the student and
saved with the stage's checkpoint.

Two model families: the zoo's CIFAR ResNets (a deeper, wider teacher, as in the
references' pairs) and VGG (a pair whose stage counts differ)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pyramidkd import testing
from pyramidkd.engine.recipe import dump_toml
from pyramidkd.engine.training.checkpoints import load_checkpoint

DIGITS = {"name": "digits", "image_size": 8, "limit": 200}
LOSSES = ("cc", "vid", "ofd", "reviewkd")
MODULES = {"cc": "embed_s.linear.weight", "vid": "regressors.0.0.weight", "ofd": "connectors.0.0.weight", "reviewkd": "abfs.0.conv1.0.weight"}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
FAMILIES = {
    "resnet": ({"name": "resnet14"}, {"name": "resnet8"}),
    "vgg": ({"name": "vgg", "layers": [8, "M", 16, "M", 16, "M"]}, {"name": "vgg", "layers": [4, "M", 8, "M"]}),
}


def _recipe(teacher_model: dict, student_model: dict) -> str:
    stages = [{"id": "teacher", "scheme": "scratch", "model": teacher_model}]
    for name in LOSSES:
        stages.append({"id": name, "scheme": {"name": "kd", "teacher": "teacher"}, "model": student_model, "loss": {"name": name}})
    return dump_toml({
        "loggers": ["files"],
        "experiment": {"name": "learned-zoo", "seed": 0, "device": "cpu"},
        "dataset": DIGITS,
        "train": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
                  "scheduler": {"name": "none"}},
        "stages": stages,
    })


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_learned_zoo_losses_train_on_digits(family, tmp_path):
    summary = testing.run_tiny(_recipe(*FAMILIES[family]), workdir=tmp_path)
    stages = {stage["stage"]: stage for stage in summary["stages"]}
    assert list(stages) == ["teacher", *LOSSES]
    for name in LOSSES:
        assert stages[name]["loss"] == name and stages[name]["teachers"][0]["stage"] == "teacher"
        assert math.isfinite(stages[name]["test_loss"]) and 0.0 <= stages[name]["test_acc"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch" and r["stage"] != "teacher"]
    assert len(epochs) == len(LOSSES) and all(math.isfinite(r["train_loss"]) for r in epochs)
    for name in LOSSES:  # the loss's modules were trained with the student and saved for an exact resume
        checkpoint = load_checkpoint(str(tmp_path / "run" / "checkpoints" / name / "last.pt"))
        assert MODULES[name] in checkpoint["loss_state"]
        optimised = sum(len(group["params"]) for group in checkpoint["optimizer"]["param_groups"])
        parameters = [key for state in (checkpoint["state_dict"], checkpoint["loss_state"]) for key in state if not key.endswith(BUFFERS)]
        assert optimised == len(parameters)
