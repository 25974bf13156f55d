"""``[train] test_every_epoch``: the literature's protocol (the best TEST epoch) as an
opt-in figure beside ours (the checkpoint chosen on validation). Off, nothing changes;
on, every epoch record holds its test accuracy, the stage result their maximum, and the
reports and ``results.json`` show it under its label."""

from __future__ import annotations

import json

import pytest

from pyramidkd.engine.records import BEST_TEST_LABEL, EpochRecord, StageResult, load_summary, read_metrics
from pyramidkd.engine.reporting.report import build_report, format_markdown
from pyramidkd.engine.sweeps.results import BEST_TEST_COLUMN, collect_results, format_results, write_results

RECIPE = """
[experiment]
name = "protocol"

[dataset]
name = "digits"
image_size = 8
val_fraction = 0.15
test_fraction = 0.15

[train]
epochs = 3
batch_size = 128

[[stages]]
id = "teacher"
scheme = "scratch"
train = { epochs = 1 }
model = { name = "vgg", layers = [8, "M", 16, "M"], batch_norm = true }

[[stages]]
id = "student-kd"
scheme = { name = "kd", teacher = "teacher" }
model = { name = "vgg", layers = [2, "M", 4, "M"], batch_norm = true, dropout = 0.0 }
loss = "kd"
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "protocol.toml"
    path.write_text(RECIPE)
    return path


def _run(recipe, out, *extra: str):
    from pyramidkd.engine.runner import run_recipe

    run_recipe(str(recipe), list(extra), output=str(out), quiet=True)
    return out


@pytest.fixture(scope="module")
def runs(recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    return _run(recipe, root / "off"), _run(recipe, root / "on", "train.test_every_epoch=true")


def test_off_writes_no_test_accuracy_per_epoch_and_no_best_test_figure(runs):
    off, _ = runs
    records = [r for r in read_metrics(str(off / "metrics.jsonl")) if isinstance(r, EpochRecord)]
    assert records and all(r.test_acc is None for r in records)
    assert all("test_acc" not in json.loads(line) for line in (off / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["kind"] == "epoch")
    summary = json.loads((off / "summary.json").read_text())
    assert all("best_test_acc" not in stage for stage in summary["stages"])
    markdown = format_markdown([build_report(str(off), plots=False)])
    assert BEST_TEST_COLUMN not in markdown and "optimistic" not in markdown


def test_on_every_epoch_is_tested_and_the_best_is_their_maximum(runs):
    _, on = runs
    records = [r for r in read_metrics(str(on / "metrics.jsonl")) if isinstance(r, EpochRecord)]
    summary = load_summary(str(on))
    for result in summary.stages:
        measured = [r.test_acc for r in records if r.stage == result.stage]
        assert measured and all(value is not None and 0.0 <= value <= 1.0 for value in measured)
        assert len(measured) == result.epochs
        assert result.best_test_acc == max(measured)
        assert result.best_test_acc >= min(measured)
    # The last epoch's test pass is the final test's when the last epoch is the one chosen.
    last = summary.stage("student-kd")
    if last.best_epoch == last.epochs:
        assert [r.test_acc for r in records if r.stage == "student-kd"][-1] == pytest.approx(last.test_acc)


def test_on_the_run_report_shows_the_column_with_its_label(runs):
    _, on = runs
    report = build_report(str(on), plots=False)
    assert all(stage["best_test_acc_pct"] is not None for stage in report["stages"])
    markdown = format_markdown([report])
    assert BEST_TEST_COLUMN in markdown and BEST_TEST_LABEL in markdown


def test_old_records_without_the_field_still_read():
    record = EpochRecord.from_dict({"kind": "epoch", "stage": "s", "epoch": 1, "val_acc": 0.5})
    assert record.test_acc is None and "test_acc" not in record.to_dict()
    result = StageResult.from_dict({"stage": "s", "entry": "s", "model": "m", "model_params": {}, "loss": "ce", "num_parameters": 1,
                                    "epochs": 1, "select": "val_acc", "best_epoch": 1, "best_val_acc": 0.5, "last_val_acc": 0.5,
                                    "test_acc": 0.5, "test_loss": 1.0})
    assert result.best_test_acc is None and "best_test_acc" not in result.to_dict()


def test_a_sweep_aggregates_it_in_results_json_with_its_label(recipe, tmp_path, cli):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f'[sweep]\nname = "protocol"\nrecipe = "{recipe}"\nseeds = [0, 1]\n'
                     'set = { "train.epochs" = 2, "train.test_every_epoch" = true }\nbaseline = { stage = "teacher" }\n')
    out = tmp_path / "out"
    done = cli("sweep", sweep, "--output", out, "--launcher", "local")
    assert done.code == 0, done.err
    results = collect_results(str(out))
    stage = results["cells"][0]["stages"]["student-kd"]
    best = stage["best_test_acc"]
    assert best["label"] == BEST_TEST_LABEL and best["n"] == 2 and best["std"] is not None
    summaries = [load_summary(str(path)) for path in sorted(out.rglob("seed-*")) if (path / "summary.json").is_file()]
    assert sorted(best["values"]) == sorted(s.stage("student-kd").best_test_acc for s in summaries)
    write_results(str(out), results)
    stored = json.loads((out / "results.json").read_text())
    assert stored["cells"][0]["stages"]["student-kd"]["best_test_acc"]["label"] == BEST_TEST_LABEL
    table = format_results(results)
    assert BEST_TEST_COLUMN in table and BEST_TEST_LABEL in table
    assert "best_test_epoch_mean_pct" in (out / "results.csv").read_text()
