"""`pyramidkd report` on a `run --seeds` folder: mean ± std per stage, one curve per seed."""

from __future__ import annotations

import json
import statistics

import pytest

from conftest import TINY_RECIPE
from pyramidkd.engine.reporting.plots import plot_seed_curves
from pyramidkd.engine.reporting.readers import load_epoch_records
from pyramidkd.engine.reporting.seeds_report import format_seeds_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    from pyramidkd.engine.cli import main

    folder = tmp_path_factory.mktemp("seeds")
    (folder / "recipe.toml").write_text(TINY_RECIPE)
    assert main(["run", str(folder / "recipe.toml"), "--quiet", "--output", str(folder / "out"), "--seeds", "0,1"]) == 0
    return folder / "out"


def rows(markdown: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| stage") and not line.startswith("| ---")}


def test_markdown_mean_and_std_per_stage(seeds_run, cli):
    result = cli("report", seeds_run)
    assert result.code == 0, result.err
    out = result.out
    assert out.startswith("## tiny over seeds 0, 1\n")
    assert ("| stage | model | params | MACs | val % (mean ± std) | test % (mean ± std) | test % per seed | published % "
            "| Δ mean − published |") in out
    table = rows(out)
    assert list(table) == ["teacher", "student"]
    for stage in ("teacher", "student"):
        per_seed = [json.loads((seeds_run / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)]
        results = [next(r for r in summary["stages"] if r["stage"] == stage) for summary in per_seed]
        tests = [100 * r["test_acc"] for r in results]
        vals = [100 * r["best_val_acc"] for r in results]
        cells = table[stage]
        assert cells[3] == f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"
        assert cells[4] == f"{statistics.fmean(tests):.2f} ± {statistics.stdev(tests):.2f}"
        assert cells[5] == ", ".join(f"{t:.2f}" for t in tests)
        assert cells[2] != "-"  # MACs of the first seed's model
        assert (seeds_run / "plots" / f"{stage}.png").read_bytes().startswith(PNG_MAGIC)
        assert f"[{stage}](plots/{stage}.png)" in out
    assert not (seeds_run / "seed-0" / "plots").exists()  # the seeds' own folders are left alone


def test_json_report_of_a_seeds_folder(seeds_run, cli):
    result = cli("report", seeds_run, "--format", "json")
    assert result.code == 0, result.err
    (report,) = json.loads(result.out)["runs"]
    assert report["kind"] == "seeds" and report["seeds"] == [0, 1] and report["experiment"] == "tiny"
    assert not (seeds_run / "seeds-summary.json").exists()  # one aggregate: the sweep's results.json
    (cell,) = json.loads((seeds_run / "results.json").read_text())["cells"]
    assert cell["seeds"] == [0, 1] and list(cell["stages"]) == [row["stage"] for row in report["stages"]]
    for row, stored in zip(report["stages"], cell["stages"].values()):
        assert row["num_parameters"] == stored["num_parameters"] > 0
        assert row["test_acc_mean_pct"] == pytest.approx(100 * stored["test_acc"]["mean"])
        assert row["test_acc_std_pct"] == pytest.approx(100 * stored["test_acc"]["std"])
        assert row["val_acc_mean_pct"] == pytest.approx(100 * stored["best_val_acc"]["mean"])
        assert list(row["test_acc_pct"].values()) == pytest.approx([100 * t for t in stored["test_acc"]["values"]])
        assert row["curves"] == str(seeds_run / "plots" / f"{row['stage']}.png")


def test_one_line_per_seed_in_the_curves(seeds_run):
    histories = {seed: load_epoch_records(str(seeds_run / f"seed-{seed}"))["student"] for seed in (0, 1)}
    figure = plot_seed_curves({"stage": "student", "model": "vgg", "num_parameters": 200, "loss": "kd"}, histories)
    accuracy, loss = figure.axes
    assert [line.get_label() for line in loss.lines] == ["seed 0", "seed 1"]
    assert [line.get_label() for line in accuracy.lines] == ["seed 0 val", "seed 0 train", "seed 1 val", "seed 1 train"]
    assert [list(line.get_xdata()) for line in loss.lines] == [[1, 2], [1, 2]]


def test_an_unfinished_seed_is_left_out_with_a_note(seeds_run, tmp_path, cli):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(seeds_run, copy)
    (copy / "seed-1" / "summary.json").unlink()
    result = cli("report", copy)
    assert result.code == 0, result.err
    assert result.out.startswith("## tiny over seeds 0\n")
    assert "note: seed-1: no summary.json (unfinished run): left out" in result.out
    # one seed has no spread: the mean alone, as in a sweep's table (never "± 0.00")
    teacher = rows(result.out)["teacher"]
    assert "±" not in teacher[3] and "±" not in teacher[4] and teacher[4] == teacher[5]


def test_the_seeds_table_formats_parameter_counts_and_spreads():
    def stats(values):
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                "n": len(values), "values": values}

    results = {"name": "x", "seeds": [0, 1], "cells": [{"id": "x", "seeds": [0, 1], "stages": {
        "teacher": {"model": "vgg", "num_parameters": 292586, "reference_test_acc": 91.5,
                    "test_acc": stats([0.89, 0.91]), "best_val_acc": stats([0.8, 0.82])},
        "student": {"model": "vgg", "num_parameters": 772, "reference_test_acc": None,
                    "test_acc": stats([0.7]), "best_val_acc": stats([0.6])}}}]}
    head, _, _, teacher, student = format_seeds_table(results).splitlines()
    assert head == "x over seeds 0, 1 (std: sample standard deviation)"
    assert teacher.split() == ["teacher", "vgg", "292.6k", "81.00", "±", "1.41", "90.00", "±", "1.41", "91.50"]
    assert student.split() == ["student", "vgg", "772", "60.00", "70.00", "-"]
