"""`pyramidkd run`: --max-epochs caps every stage (the seeds path too); bad values are usage errors."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_RECIPE

# The student trains 3 epochs of its own; --max-epochs must cap it too.
STAGE_EPOCHS_RECIPE = TINY_RECIPE.replace('loss = { name = "kd", temperature = 2.0, alpha = 0.7 }',
                                          'loss = { name = "kd", temperature = 2.0, alpha = 0.7 }\ntrain = { epochs = 3 }')


def epochs_by_stage(run_dir) -> dict[str, list[int]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    found: dict[str, list[int]] = {}
    for record in records:
        if record["kind"] == "epoch":
            found.setdefault(record["stage"], []).append(record["epoch"])
    return found


@pytest.mark.parametrize("value, message", [("0", "must be >= 1, got 0"), ("-2", "must be >= 1, got -2"),
                                            ("two", "must be a whole number >= 1, got 'two'")])
def test_max_epochs_must_be_a_positive_integer(cli, write_recipe, value, message):
    result = cli("run", write_recipe(TINY_RECIPE), "--max-epochs", value)
    assert result.code == 2
    assert f"argument --max-epochs: {message}" in result.err and "Traceback" not in result.err


def test_max_epochs_reaches_run_recipe_and_the_seeds(cli, write_recipe, tmp_path, monkeypatch):
    calls = []

    def fake_run_recipe(recipe, overrides=(), **options):
        calls.append(options)
        return {"experiment": "tiny", "recipe": str(recipe), "seed": 0, "device": "cpu", "time_s": 0.0, "stages": [],
                "dataset": {"name": "synthetic", "num_classes": 4, "input_shape": [3, 8, 8], "train": 1, "val": 1, "test": 1}}

    monkeypatch.setattr("pyramidkd.engine.runner.run_recipe", fake_run_recipe)
    recipe = write_recipe(TINY_RECIPE)
    assert cli("run", recipe, "--max-epochs", "4", "--output", tmp_path / "one").code == 0
    assert calls[-1]["max_epochs"] == 4
    assert cli("run", recipe, "--output", tmp_path / "two").code == 0
    assert calls[-1]["max_epochs"] is None
    # --seeds runs each seed in a child process (a one-cell sweep): real runs, capped
    monkeypatch.undo()
    assert cli("run", recipe, "--max-epochs", "1", "--seeds", "0,1", "--output", tmp_path / "seeds").code == 0
    for seed in (0, 1):
        assert epochs_by_stage(tmp_path / "seeds" / f"seed-{seed}") == {"teacher": [1], "student": [1]}


def test_max_epochs_caps_every_stage_of_a_run(cli, write_recipe, tmp_path):
    recipe = write_recipe(STAGE_EPOCHS_RECIPE)
    result = cli("run", recipe, "--quiet", "--output", tmp_path / "run", "--max-epochs", "1")
    assert result.code == 0, result.err
    assert epochs_by_stage(tmp_path / "run") == {"teacher": [1], "student": [1]}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [stage["epochs"] for stage in summary["stages"]] == [1, 1]
