"""A sweep folder's results: aggregation over seeds, paired comparisons with the
baselines, results.json/csv/md, the console table and `pyramidkd report DIR`.

The folders are written by hand (sweep.json, sweep-state.json, fake summary.json
files with known accuracies): nothing is trained.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics

import pytest
from scipy import stats as scipy_stats

from pyramidkd.engine.records import DatasetInfo, RunSummary, StageResult
from pyramidkd.engine.reporting.plots import plot_sweep_stage
from pyramidkd.engine.sweeps.results import collect_results, format_results, write_results
from pyramidkd.engine.sweeps.stats import paired_comparison

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEY = "stages.student.loss.temperature"
T_975_DF2 = 4.302652729749462  # t(0.975) for 2 degrees of freedom
T_975_DF1 = 12.706204736174694  # and for 1

# test accuracy by cell, seed and stage; best_val_acc is test + 0.01
TEACHER = {0: 0.80, 1: 0.82, 2: 0.84}  # the same runs in every cell (only the student's loss changes)
STUDENT = {
    "t=2": {0: 0.74, 1: 0.73, 2: 0.76},
    "t=4": {0: 0.70, 1: 0.72, 2: 0.71},
    "t=8": {0: 0.69, 2: 0.66},  # seed 1 failed
    "t=16": {0: 0.75},  # seeds 1 and 2 not finished
}
BASELINES = [{"label": "t=4", "cell": "t=4", "stage": None}, {"label": "teacher", "cell": None, "stage": "teacher"}]


def stage_result(stage: str, test: float) -> StageResult:
    return StageResult(stage=stage, entry=stage, model="vgg", model_params={}, loss="ce", num_parameters=292586 if stage == "teacher" else 1234,
                       epochs=2, select="val_acc", best_epoch=2, best_val_acc=test + 0.01, last_val_acc=test, test_acc=test,
                       test_loss=0.5, time_s=3.0 if stage == "teacher" else 1.5)


def write_summary(run_dir, seed: int, tests: dict[str, float]) -> None:
    summary = RunSummary(experiment="tiny", recipe="/recipes/tiny.toml", seed=seed, device="cpu",
                         dataset=DatasetInfo("synthetic", 4, [3, 8, 8], 96, 32, 32),
                         stages=tuple(stage_result(stage, test) for stage, test in tests.items()), time_s=4.5)
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summary.to_dict()))


def write_sweep(folder, cells: dict[str, dict[int, float]], seeds, baselines, *, runs=None, cell_folder=lambda c: c):
    folder.mkdir(exist_ok=True)
    sweep = {"format": 1, "name": "kd-temperature", "file": "/abs/sweep.toml", "seeds": seeds, "baselines": baselines,
             "cells": [{"id": cell, "recipe": "../recipes/tiny.toml", "recipe_path": "/recipes/tiny.toml",
                        "overrides": {KEY: float(cell[2:])} if cell.startswith("t=") else {}, "folder": cell_folder(cell)}
                       for cell in cells]}
    (folder / "sweep.json").write_text(json.dumps(sweep))
    state = {}
    for cell, students in cells.items():
        for seed, student in students.items():
            write_summary(folder / cell_folder(cell) / f"seed-{seed}", seed, {"teacher": TEACHER[seed], "student": student})
            state[f"{cell}/seed-{seed}"] = {"status": "done", "error": None, "time_s": 4.5, "log": f"logs/{cell}/seed-{seed}.log"}
    state.update(runs or {})
    (folder / "sweep-state.json").write_text(json.dumps({"runs": state}))
    return folder


FAILED = {"t=8/seed-1": {"status": "failed", "error": "RuntimeError: boom", "time_s": 0.3, "log": "logs/t=8/seed-1.log"}}


@pytest.fixture
def sweep_dir(tmp_path):
    return write_sweep(tmp_path / "sweep", STUDENT, [0, 1, 2], BASELINES, runs=FAILED)


@pytest.fixture
def results(sweep_dir):
    return collect_results(str(sweep_dir))


def cell(results, cell_id):
    return next(c for c in results["cells"] if c["id"] == cell_id)


def test_cells_seeds_failed_and_missing(results):
    assert results["name"] == "kd-temperature" and results["seeds"] == [0, 1, 2]
    assert [c["id"] for c in results["cells"]] == ["t=2", "t=4", "t=8", "t=16"]
    assert results["baselines"] == BASELINES
    t8, t16 = cell(results, "t=8"), cell(results, "t=16")
    assert t8["seeds"] == [0, 2] and t8["missing"] == []
    assert t8["failed"] == [{"seed": 1, "error": "RuntimeError: boom", "log": "logs/t=8/seed-1.log"}]
    assert t16["seeds"] == [0] and t16["failed"] == [] and t16["missing"] == [1, 2]
    assert cell(results, "t=2")["overrides"] == {KEY: 2.0} and cell(results, "t=2")["recipe"] == "../recipes/tiny.toml"


def test_mean_and_sample_std_per_stage(results):
    student = cell(results, "t=2")["stages"]["student"]
    assert (student["model"], student["num_parameters"], student["epochs"]) == ("vgg", 1234, 2)
    values = [0.74, 0.73, 0.76]
    assert student["test_acc"]["values"] == values and student["test_acc"]["n"] == 3
    assert student["test_acc"]["mean"] == pytest.approx(0.743333333)
    assert student["test_acc"]["std"] == pytest.approx(0.0152752523)  # sqrt(((-1/300)^2 + (-4/300)^2 + (5/300)^2) / 2)
    assert student["best_val_acc"]["values"] == pytest.approx([v + 0.01 for v in values])
    assert student["best_val_acc"]["mean"] == pytest.approx(0.753333333)
    assert student["time_s"] == {"mean": 1.5, "std": 0.0, "n": 3, "values": [1.5, 1.5, 1.5]}
    t8 = cell(results, "t=8")["stages"]["student"]["test_acc"]
    assert t8["values"] == [0.69, 0.66] and t8["mean"] == pytest.approx(0.675)  # in the order of the cell's seeds
    one = cell(results, "t=16")["stages"]["student"]["test_acc"]
    assert one == {"mean": 0.75, "std": None, "n": 1, "values": [0.75]}  # no sample std of one value


def test_paired_difference_ci_and_p_value(results):
    comparison = cell(results, "t=2")["stages"]["student"]["vs"]["t=4"]
    differences = [0.04, 0.01, 0.05]
    std = statistics.stdev(differences)
    assert comparison["baseline"] == "t=4" and comparison["against"] == "t=4/student"
    assert comparison["seeds"] == [0, 1, 2] and comparison["n"] == 3
    assert comparison["mean_diff"] == pytest.approx(1 / 30)
    assert comparison["std_diff"] == pytest.approx(0.0208166600)
    margin = T_975_DF2 * std / math.sqrt(3)
    assert comparison["ci95"] == pytest.approx([1 / 30 - margin, 1 / 30 + margin])
    assert comparison["ci95"] == pytest.approx([-0.018379, 0.085045], abs=1e-6)
    t = (1 / 30) / (std / math.sqrt(3))
    assert comparison["p_value"] == pytest.approx(2 * scipy_stats.t.sf(t, 2))
    assert comparison["p_value"] == pytest.approx(0.10913, abs=1e-5)


def test_pairing_keeps_only_the_seeds_both_have(results):
    comparison = cell(results, "t=8")["stages"]["student"]["vs"]["t=4"]  # t=8 has seeds 0 and 2
    assert comparison["seeds"] == [0, 2] and comparison["n"] == 2
    assert comparison["mean_diff"] == pytest.approx(-0.03)  # (0.69 - 0.70 + 0.66 - 0.71) / 2
    assert comparison["std_diff"] == pytest.approx(math.sqrt(2) * 0.02)
    assert comparison["ci95"] == pytest.approx([-0.03 - T_975_DF1 * 0.02, -0.03 + T_975_DF1 * 0.02])
    assert comparison["p_value"] == pytest.approx(scipy_stats.ttest_rel([0.69, 0.66], [0.70, 0.71]).pvalue)
    one = cell(results, "t=16")["stages"]["student"]["vs"]["t=4"]
    assert one["n"] == 1 and one["mean_diff"] == pytest.approx(0.05)
    assert one["std_diff"] is None and one["ci95"] is None and one["p_value"] is None


def test_what_is_compared_with_what(results):
    t2 = cell(results, "t=2")["stages"]
    assert set(t2["teacher"]["vs"]) == {"t=4"}  # not the teacher with itself
    same = t2["teacher"]["vs"]["t=4"]  # the same teacher runs: no difference at all
    assert (same["mean_diff"], same["std_diff"], same["ci95"], same["p_value"]) == (0.0, 0.0, [0.0, 0.0], 1.0)
    within = t2["student"]["vs"]["teacher"]
    assert within["against"] == "t=2/teacher" and within["mean_diff"] == pytest.approx(-0.23 / 3)
    baseline = cell(results, "t=4")["stages"]
    assert set(baseline["student"]["vs"]) == {"teacher"} and baseline["teacher"]["vs"] == {}


def test_constant_nonzero_differences_have_p_zero():
    comparison = paired_comparison({0: 0.5, 1: 0.75}, {0: 0.25, 1: 0.5})
    assert comparison["std_diff"] == 0.0 and comparison["ci95"] == [0.25, 0.25] and comparison["p_value"] == 0.0


def test_results_files(sweep_dir, results):
    write_results(str(sweep_dir), results)
    assert json.loads((sweep_dir / "results.json").read_text()) == json.loads(json.dumps(results))
    rows = list(csv.DictReader(io.StringIO((sweep_dir / "results.csv").read_text())))
    assert [(r["cell"], r["stage"]) for r in rows] == [(c, s) for c in STUDENT for s in ("teacher", "student")]
    row = rows[1]
    assert (row[KEY], row["recipe"], row["model"], row["params"], row["n"], row["failed"]) == ("2.0", "../recipes/tiny.toml", "vgg", "1234", "3", "0")
    assert (row["test_mean_pct"], row["test_std_pct"], row["val_mean_pct"], row["val_std_pct"]) == ("74.33", "1.53", "75.33", "1.53")
    assert (row["diff_vs_t=4_pct"], row["ci95_low_vs_t=4_pct"], row["ci95_high_vs_t=4_pct"], row["p_vs_t=4"]) == ("3.33", "-1.84", "8.50", "0.1091")
    assert (row["diff_vs_teacher_pct"], row["n_vs_teacher"]) == ("-7.67", "3")
    t16 = rows[7]
    assert (t16["cell"], t16["n"], t16["test_std_pct"], t16["ci95_low_vs_t=4_pct"], t16["p_vs_t=4"]) == ("t=16", "1", "", "", "")
    assert rows[5]["failed"] == "1"
    markdown = (sweep_dir / "results.md").read_text()
    assert markdown.startswith("# kd-temperature\n")
    assert ("| cell | stage | model | params | n | test % (mean ± std) | val % (mean ± std) | Δ vs t=4 (95% CI, p) "
            "| Δ vs teacher (95% CI, p) |") in markdown
    assert "| t=2 | student | vgg | 1.2k | 3 | 74.33 ± 1.53 | 75.33 ± 1.53 | +3.33 [-1.84, +8.50], p=0.109 | -7.67 [" in markdown
    assert "- cell t=8: seed 1 failed: RuntimeError: boom (log: logs/t=8/seed-1.log)" in markdown


def test_console_table(results):
    lines = format_results(results).splitlines()
    assert lines[0] == "kd-temperature: 4 cells x seeds 0, 1, 2; 9 runs finished, 1 failed, 2 not finished"
    table = {tuple(line.split()[:2]): line for line in lines[3:8]}
    assert lines[1].split("  ")[0] == "cell" and "Δ vs t=4 (95% CI, p)" in lines[1]
    assert "74.33 ± 1.53" in table["t=2", "student"] and "+3.33 [-1.84, +8.50], p=0.109" in table["t=2", "student"]
    # The teacher is the same in every cell: one row, marked shared, instead of +0.00 [+0.00, +0.00] per cell.
    assert [key for key in table if key[1] == "teacher"] == [("(shared)", "teacher")]
    shared = table["(shared)", "teacher"]
    assert "292.6k" in shared and "82.00 ± 2.00" in shared and "(the same in every cell)" in shared and "(baseline)" in shared
    assert "+0.00" not in format_results(results) and "(shared): a stage the grid does not change" in lines[8]
    assert "75.00  " in table["t=16", "student"] and "+5.00 (n=1)" in table["t=16", "student"]
    assert "cell t=8: seed 1 failed: RuntimeError: boom (log: logs/t=8/seed-1.log)" in lines
    assert "cell t=16: not finished: seed 1, 2" in lines


def test_a_sweep_without_any_finished_run(tmp_path):
    folder = write_sweep(tmp_path / "empty", {"t=2": {}, "t=4": {}}, [0, 1], BASELINES)
    results = collect_results(str(folder))
    assert [(c["seeds"], c["missing"], c["stages"]) for c in results["cells"]] == [([], [0, 1], {}), ([], [0, 1], {})]
    text = format_results(results)
    assert "0 runs finished, 0 failed, 4 not finished" in text and "t=2   (no finished run)" in text


def test_the_stage_plot(results):
    drawing = plot_sweep_stage(results, "student")
    (axes,) = drawing.axes
    assert [label.get_text() for label in axes.get_xticklabels()] == ["t=2", "t=4", "t=8", "t=16"]
    dots = sorted(round(y, 6) for line in axes.lines if line.get_color() == "gray" for y in line.get_ydata())
    assert dots == sorted(round(100 * v, 6) for c in STUDENT.values() for v in c.values())
    assert any(line.get_label() == "baseline t=4" for line in axes.lines)


def test_report_of_a_sweep_folder(sweep_dir, cli):
    result = cli("report", sweep_dir)
    assert result.code == 0, result.err
    assert result.out.startswith("kd-temperature: 4 cells x seeds 0, 1, 2;")
    assert "+3.33 [-1.84, +8.50], p=0.109" in result.out
    assert "Plots (in the sweep folder): [teacher](plots/teacher.png), [student](plots/student.png)" in result.out
    for stage in ("teacher", "student"):
        assert (sweep_dir / "plots" / f"{stage}.png").read_bytes().startswith(PNG_MAGIC)
    stored = json.loads((sweep_dir / "results.json").read_text())
    assert cell(stored, "t=2")["stages"]["student"]["vs"]["t=4"]["n"] == 3
    assert (sweep_dir / "results.csv").exists() and (sweep_dir / "results.md").exists()
    as_json = cli("report", sweep_dir, "--format", "json")
    (report,) = json.loads(as_json.out)["runs"]
    assert report["kind"] == "sweep" and report["results"] == stored


def test_report_of_a_seeds_sweep_keeps_the_seeds_report(tmp_path, cli):
    failed = {"/seed-2": {"status": "failed", "error": "ValueError: nan loss", "time_s": 1.0, "log": "logs/seed-2.log"}}
    folder = write_sweep(tmp_path / "seeds", {"": {0: 0.74, 1: 0.73}}, [0, 1, 2], [], runs=failed, cell_folder=lambda c: "")
    result = cli("report", folder)
    assert result.code == 0, result.err
    assert result.out.startswith("## tiny over seeds 0, 1\n")
    assert "| student | vgg | 1.2k | - | 74.50 ± 0.71 | 73.50 ± 0.71 | 74.00, 73.00 |" in result.out
    assert "note: seed 2 failed: ValueError: nan loss (log: logs/seed-2.log)" in result.out
    stored = json.loads((folder / "results.json").read_text())
    assert stored["cells"][0]["seeds"] == [0, 1] and stored["cells"][0]["failed"][0]["seed"] == 2


def chain_result(stage: str, entry: str, test: float, train_macs: int, time_s: float) -> StageResult:
    return StageResult(stage=stage, entry=entry, model="svgg5", model_params={}, loss="ce", num_parameters=1234, epochs=2,
                       select="val_acc", best_epoch=2, best_val_acc=test, last_val_acc=test, test_acc=test, test_loss=0.5,
                       time_s=time_s, macs=1000, train_macs=train_macs)


def test_methods_sum_their_stages_cost_and_read_their_final_stage(tmp_path, cli):
    """A chain (one recipe entry, several stages) is one method: its accuracy is its
    final stage's, its cost and time the sums over its stages."""
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps({
        "format": 1, "name": "study", "seeds": [0, 1], "baselines": [{"label": "scratch", "cell": None, "stage": "scratch"}],
        "cells": [{"id": "all", "recipe": "all.toml", "overrides": {}, "folder": "all"}]}))
    for seed, (scratch, final) in enumerate([(0.50, 0.56), (0.52, 0.55)]):
        stages = (chain_result("scratch", "scratch", scratch, 100, 1.0),
                  chain_result("chain.a.hint", "chain", 0.3, 1000, 2.0),
                  chain_result("chain.a", "chain", 0.6, 2000, 3.0),
                  chain_result("chain.b", "chain", final, 300 + seed, 4.0))
        summary = RunSummary(experiment="study", recipe="/all.toml", seed=seed, device="cpu",
                             dataset=DatasetInfo("synthetic", 4, [3, 8, 8], 96, 32, 32), stages=stages, time_s=10.0)
        (folder / "all" / f"seed-{seed}").mkdir(parents=True)
        (folder / "all" / f"seed-{seed}" / "summary.json").write_text(json.dumps(summary.to_dict()))
    results = collect_results(str(folder))
    methods = results["cells"][0]["methods"]
    assert list(methods) == ["scratch", "chain"]
    chain = methods["chain"]
    assert chain["stages"] == ["chain.a.hint", "chain.a", "chain.b"] and chain["final_stage"] == "chain.b"
    assert chain["train_macs"]["values"] == [3300, 3301] and chain["time_s"]["values"] == [9.0, 9.0] and chain["epochs"] == 6
    vs = results["cells"][0]["stages"]["chain.b"]["vs"]["scratch"]
    assert vs["mean_diff"] == pytest.approx(0.045) and vs["n"] == 2
    text = format_results(results)
    assert "method" in text and "chain.b" in text and "3.3k" in text and "+4.50 [" in text
    result = cli("report", folder)
    assert result.code == 0, result.err
    assert (folder / "plots" / "accuracy-vs-cost.png").read_bytes().startswith(PNG_MAGIC)
    assert "## By method" in (folder / "results.md").read_text()


def test_folders_written_before_num_parameters_still_report(tmp_path, cli):
    """Run summaries before 0.3.0 name the parameter count "params"; they still read."""
    folder = write_sweep(tmp_path / "old", {"t=2": {0: 0.74}}, [0], [])
    path = folder / "t=2" / "seed-0" / "summary.json"
    old = json.loads(path.read_text())
    for stage in old["stages"]:
        stage["params"] = stage.pop("num_parameters")
    path.write_text(json.dumps(old))
    results = collect_results(str(folder))
    assert cell(results, "t=2")["stages"]["student"]["num_parameters"] == 1234
    assert RunSummary.from_dict(old).stages[0].num_parameters == 292586
    with pytest.warns(DeprecationWarning, match="num_parameters"):
        assert RunSummary.from_dict(old).stages[0].params == 292586


@pytest.mark.parametrize("text", ["{not json", '{"runs": ["a list"]}', "[]"])
def test_a_damaged_state_file_is_one_clear_error_everywhere(tmp_path, cli, text):
    from pyramidkd.engine.errors import RunDirectoryError
    from pyramidkd.engine.sweeps.folder import SweepFolder

    folder = write_sweep(tmp_path / "damaged", {"t=2": {0: 0.74}}, [0], [])
    (folder / "sweep-state.json").write_text(text)
    for read in (lambda: collect_results(str(folder)), SweepFolder(str(folder)).read_state):
        with pytest.raises(RunDirectoryError) as raised:
            read()
        assert raised.value.file == str(folder / "sweep-state.json") and "delete sweep-state.json" in raised.value.fix
    result = cli("report", folder)
    assert result.code == 1 and "sweep-state.json" in result.err and "fix: delete sweep-state.json" in result.err


def test_a_stage_is_shared_only_with_the_same_plan_and_results_in_every_cell():
    from pyramidkd.engine.sweeps.results import shared_stages

    def cell_with(cell_id, tests):
        return {"id": cell_id, "seeds": [0, 1], "stages": {"teacher": {"test_acc": {"values": tests}}}}

    same = [cell_with("a", [0.8, 0.9]), cell_with("b", [0.8, 0.9])]
    assert shared_stages(same, {}) == ["teacher"]
    assert shared_stages([same[0]], {}) == []  # one cell: nothing to share
    assert shared_stages([same[0], cell_with("b", [0.8, 0.7])], {}) == []
    planned = {"a": {("teacher", 0): "f1", ("teacher", 1): "f2"}, "b": {("teacher", 0): "f1", ("teacher", 1): "other"}}
    assert shared_stages(same, planned) == []  # equal accuracies, different plans
