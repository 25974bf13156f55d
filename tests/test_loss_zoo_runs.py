"""End to end: every method-zoo loss trains in a real run on ``digits``, in the kd
scheme, which taps what the loss declares (``Loss.student_taps()`` /
``teacher_taps()``) through each model's ``tap_points()``.

One recipe per model family: a teacher from scratch, then one student stage per
loss. A loss whose taps were not recorded, or whose shapes do not match, stops the
run with an error, so a run that completes has fed every loss its features.
(This needs the kd scheme's tapping of the feature-tap contract, engine/training/taps.py.)
"""

from __future__ import annotations

import json
import math

import pytest

from pyramidkd import testing
from pyramidkd.engine.recipe import dump_toml

DIGITS = {"name": "digits", "image_size": 8, "limit": 200}
LOGIT_LOSSES = {"kd-standardize": ("kd", {"standardize": True, "temperature": 2.0, "kd_weight": 9.0, "ce_weight": 0.1}),
                "dkd": ("dkd", {}), "dist": ("dist", {})}
FEATURE_LOSSES = {name: (name, {}) for name in ("at", "nst", "sp", "pkt", "rkd", "kdsvd")}

FAMILIES = {
    # A VGG pair whose stages 1 and 2 have equal widths (kdsvd compares channels).
    "vgg": ({"name": "vgg", "layers": [8, "M", 16, "M", 16, "M"]}, {"name": "vgg", "layers": [4, "M", 16, "M", 16, "M"]},
            {**LOGIT_LOSSES, **FEATURE_LOSSES}),
    # The model zoo's CIFAR ResNets (feat.1 … feat.3, pooled), as in RepDistiller.
    "resnet": ({"name": "resnet8"}, {"name": "resnet8"}, FEATURE_LOSSES),
}


def _recipe(teacher_model: dict, student_model: dict, losses: dict) -> str:
    stages = [{"id": "teacher", "scheme": "scratch", "model": teacher_model}]
    for stage_id, (name, params) in losses.items():
        stages.append({"id": stage_id, "scheme": {"name": "kd", "teacher": "teacher"}, "model": student_model,
                       "loss": {"name": name, **params}})
    return dump_toml({
        "loggers": ["files"],
        "experiment": {"name": "loss-zoo", "seed": 0, "device": "cpu"},
        "dataset": DIGITS,
        "train": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
                  "scheduler": {"name": "none"}},
        "stages": stages,
    })


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_zoo_loss_trains_on_digits(family, tmp_path):
    teacher_model, student_model, losses = FAMILIES[family]
    summary = testing.run_tiny(_recipe(teacher_model, student_model, losses), workdir=tmp_path)
    stages = {stage["stage"]: stage for stage in summary["stages"]}
    assert list(stages) == ["teacher", *losses]
    for stage_id, (name, _) in losses.items():
        assert stages[stage_id]["loss"] == name and stages[stage_id]["teachers"][0]["stage"] == "teacher"
        assert math.isfinite(stages[stage_id]["test_loss"]) and 0.0 <= stages[stage_id]["test_acc"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch" and r["stage"] != "teacher"]
    assert len(epochs) == len(losses) and all(math.isfinite(r["train_loss"]) for r in epochs)
