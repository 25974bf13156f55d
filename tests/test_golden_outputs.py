"""The JSON a run writes keeps its shape: a quickstart run (2 epochs a stage) is
compared with files written by the engine before its outputs became typed records.

Keys, their order, value types and the identity fields must match exactly. Measured
numbers (accuracies, losses, times) are compared by type only: another CPU may round
differently inside PyTorch's own kernels. A stage result's ``fingerprint`` (added
with reuse by fingerprint) is compared by type too: it changes whenever the
training settings gain a field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import RECIPES

GOLDEN = Path(__file__).parent / "golden" / "quickstart"
# Values that identify what was run; anything else is a measurement.
EXACT_KEYS = {"kind", "stage", "entry", "epoch", "epochs", "model", "model_params", "loss", "num_parameters", "select",
              "checkpoint", "experiment", "seed", "device", "dataset", "inherited_tensors", "info", "reference_test_acc", "macs", "train_macs",
              "teachers"}
MEASURED_IN_TEACHERS = {"test_acc"}


def _same_shape(actual, expected, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            _same_shape(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            _same_shape(a, e, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert isinstance(actual, (float, int)) and not isinstance(actual, bool), where
    else:
        assert type(actual) is type(expected), f"{where}: {actual!r} vs {expected!r}"


def _same_identity(actual: dict, expected: dict, where: str) -> None:
    for key in EXACT_KEYS & set(expected):
        if key == "teachers":
            strip = [{k: v for k, v in t.items() if k not in MEASURED_IN_TEACHERS} for t in expected[key]]
            assert [{k: v for k, v in t.items() if k not in MEASURED_IN_TEACHERS} for t in actual[key]] == strip, where
        else:
            assert actual[key] == expected[key], f"{where}.{key}: {actual[key]!r} != {expected[key]!r}"


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    from pyramidkd.engine.runner import run_recipe

    out = tmp_path_factory.mktemp("golden") / "run"
    run_recipe(str(RECIPES / "quickstart.toml"), ["train.epochs=2", "stages.teacher.train.epochs=2"], output=str(out), quiet=True)
    return out


def test_summary_json_keeps_its_shape(quickstart_run):
    actual = json.loads((quickstart_run / "summary.json").read_text())
    expected = json.loads((GOLDEN / "summary.json").read_text())
    _same_shape(actual, expected, "summary")
    _same_identity(actual, expected, "summary")
    for index, (a, e) in enumerate(zip(actual["stages"], expected["stages"])):
        _same_identity(a, e, f"summary.stages[{index}]")


def test_stage_result_json_keeps_its_shape(quickstart_run):
    actual = json.loads((quickstart_run / "checkpoints" / "student-kd" / "result.json").read_text())
    expected = json.loads((GOLDEN / "result-student-kd.json").read_text())
    _same_shape(actual, expected, "result")
    _same_identity(actual, expected, "result")
    assert re.fullmatch("[0-9a-f]{64}", actual["fingerprint"])  # sha256 of the stage's plan (decides reuse)


def test_metrics_jsonl_keeps_its_shape(quickstart_run):
    actual = [json.loads(line) for line in (quickstart_run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (GOLDEN / "metrics.jsonl").read_text().splitlines()]
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        _same_shape(a, e, f"metrics[{index}]")
        _same_identity(a, e, f"metrics[{index}]")
