"""A sweep folder's results: every cell's finished runs read back and aggregated
per stage over the seeds, compared with the baselines paired by seed, and written
as ``results.json`` (fractions 0..1), ``results.csv`` and ``results.md`` (percent,
two decimals).

``collect_results(DIR)`` reads ``DIR/sweep.json`` (the cells), each run's
``summary.json`` (``DIR/<cell folder>/seed-N``) and ``DIR/sweep-state.json`` (the
failed runs); a sweep still running or partly failed is read as it stands: the
seeds without a finished run are listed under ``failed`` or ``missing``. The
statistics' conventions are in :mod:`.stats`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Iterator

from ..errors import RunDirectoryError
from ..formatting import format_count, format_duration, format_markdown_table, format_number, format_table, percent
from ..records import BEST_TEST_LABEL, RunSummary, has_summary, load_summary
from ..rundir import atomic_write_json, atomic_write_text
from .folder import DEFINITION_FILE as SWEEP_FILE
from .folder import SweepFolder, run_key
from .methods import aggregate_methods, has_chains
from .stats import mean_std, paired_comparison

RESULTS_JSON, RESULTS_CSV, RESULTS_MD = "results.json", "results.csv", "results.md"
METRICS = ("test_acc", "best_val_acc", "time_s", "train_macs")  # StageResult fields aggregated over the seeds
NOTE = ("mean ± std over the seeds with a finished run (std: sample standard deviation, - for one seed); "
        "Δ: test accuracy minus the baseline's, in points, paired by seed, with its 95 % t-interval and "
        "the paired t-test's p-value.")
SHARED_NOTE = "(shared): a stage the grid does not change (the same plan and results in every cell), listed once."
BEST_TEST_COLUMN = "best test epoch % (literature's protocol)"
BEST_TEST_NOTE = (f"{BEST_TEST_COLUMN}: each seed's highest test accuracy over its epochs ({BEST_TEST_LABEL}, as the "
                  "papers report it; [train] test_every_epoch = true), mean ± std; test % is the checkpoint chosen on validation.")
RERUN_FIX = "run the sweep into this folder again (pyramidkd sweep SWEEP.toml --output DIR) to rewrite it"


# --- reading ----------------------------------------------------------------------


def is_sweep_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SWEEP_FILE))


def read_sweep(folder: str) -> dict:
    """``DIR/sweep.json``, checked for the keys the results need."""
    sweep = SweepFolder(folder).stored_definition()
    if sweep is None:
        raise RunDirectoryError(f"holds no {SWEEP_FILE}: not a sweep folder", file=folder,
                                fix="pass the --output folder of `pyramidkd sweep`")
    cells = sweep.get("cells") if isinstance(sweep, dict) else None
    if (not isinstance(cells, list) or not isinstance(sweep.get("seeds"), list)
            or not all(isinstance(c, dict) and "id" in c for c in cells)):
        raise RunDirectoryError(f"{SWEEP_FILE} has no list of seeds and of cells with an id", file=os.path.join(folder, SWEEP_FILE),
                                fix=RERUN_FIX)
    return sweep


# --- aggregating ------------------------------------------------------------------


def collect_results(folder: str) -> dict:
    """The results of the sweep in ``folder`` as they stand (see the module docstring)."""
    folder = os.path.abspath(folder)
    sweep = read_sweep(folder)
    runs = SweepFolder(folder).read_state()
    cells, fingerprints = [], {}
    for cell in sweep["cells"]:
        summaries: dict[int, RunSummary] = {}
        failed, missing = [], []
        for seed in sweep["seeds"]:
            path = SweepFolder(folder).run_folder(cell.get("folder") or "", seed)
            state = runs.get(run_key(cell["id"], seed)) or {}
            if has_summary(path):
                summaries[seed] = load_summary(path)
            elif state.get("status") == "failed":
                failed.append({"seed": seed, "error": state.get("error"), "log": state.get("log")})
            else:
                missing.append(seed)
        cells.append({
            "id": cell["id"],
            "recipe": cell.get("recipe"),
            "overrides": dict(cell.get("overrides") or {}),
            "seeds": list(summaries),
            "stages": aggregate_stages(summaries),
            "methods": aggregate_methods(summaries),
            "failed": failed,
            "missing": missing,
        })
        fingerprints[cell["id"]] = {(r.stage, seed): r.fingerprint for seed, summary in summaries.items() for r in summary.stages}
    baselines = list(sweep.get("baselines") or [])
    _add_comparisons(cells, baselines)
    return {"name": sweep.get("name"), "seeds": list(sweep["seeds"]), "cells": cells, "baselines": baselines,
            "shared_stages": shared_stages(cells, fingerprints)}


def shared_stages(cells: list[dict], fingerprints: dict[str, dict]) -> list[str]:
    """The stages the grid does not change: in every cell with finished runs (two or
    more), with the same plan (fingerprint) and the same test accuracy seed by seed."""
    finished = [cell for cell in cells if cell["stages"]]
    if len(finished) < 2:
        return []
    shared = []
    for stage_id in finished[0]["stages"]:
        if not all(stage_id in cell["stages"] for cell in finished):
            continue
        seen: dict[int, tuple] = {}
        same = True
        for cell in finished:
            for seed, value in _test_by_seed(cell, cell["stages"][stage_id]).items():
                mark = (fingerprints.get(cell["id"], {}).get((stage_id, seed)), value)
                same = same and seen.setdefault(seed, mark) == mark
        if same and seen:
            shared.append(stage_id)
    return shared


def aggregate_stages(summaries: dict[int, RunSummary]) -> dict[str, dict]:
    """Per stage id (in the order the runs list them): the first run's model, its
    parameter count and published accuracy, then each metric over the seeds (None
    where a run lacks the stage). The one aggregation of runs over seeds: sweeps,
    ``run --seeds`` and their reports all read it."""
    stage_ids = list(dict.fromkeys(result.stage for summary in summaries.values() for result in summary.stages))
    stages = {}
    for stage_id in stage_ids:
        results = [summary.stage(stage_id) for summary in summaries.values()]
        first = next(result for result in results if result is not None)
        stages[stage_id] = {"model": first.model, "num_parameters": first.num_parameters, "epochs": first.epochs,
                            "reference_test_acc": first.reference_test_acc}
        for field in METRICS:
            stages[stage_id][field] = mean_std([None if r is None else getattr(r, field) for r in results])
        best_test = [None if r is None else r.best_test_acc for r in results]
        if any(value is not None for value in best_test):  # only where measured (test_every_epoch)
            stages[stage_id]["best_test_acc"] = {**mean_std(best_test), "label": BEST_TEST_LABEL}
        stages[stage_id]["vs"] = {}
    return stages


def _test_by_seed(cell: dict, stage: dict) -> dict[int, float]:
    return {seed: value for seed, value in zip(cell["seeds"], stage["test_acc"]["values"]) if value is not None}


def _add_comparisons(cells: list[dict], baselines: list[dict]) -> None:
    """Each stage's ``vs[label]``: its test accuracy minus the baseline's, paired by seed.
    A baseline names a cell (None: the same cell) and a stage (None: the same stage)."""
    by_id = {cell["id"]: cell for cell in cells}
    for baseline in baselines:
        for cell in cells:
            reference_cell = cell if baseline.get("cell") is None else by_id.get(baseline["cell"])
            for stage_id, stage in cell["stages"].items():
                reference_id = baseline.get("stage") or stage_id
                if reference_cell is None or (reference_cell is cell and reference_id == stage_id):
                    continue  # an unknown cell, or the stage itself
                reference = reference_cell["stages"].get(reference_id)
                if reference is None:
                    continue
                comparison = paired_comparison(_test_by_seed(cell, stage), _test_by_seed(reference_cell, reference))
                stage["vs"][baseline["label"]] = {"baseline": baseline["label"],
                                                  "against": f"{reference_cell['id']}/{reference_id}", **comparison}


def is_reference(baseline: dict, cell_id: str, stage_id: str) -> bool:
    """Whether (cell, stage) is what the baseline compares the others with."""
    return baseline.get("cell") in (None, cell_id) and baseline.get("stage") in (None, stage_id)


# --- tables -------------------------------------------------------------------------


def stage_rows(results: dict) -> Iterator[tuple[dict, str | None, dict | None]]:
    """(cell, stage id, stage) per cell and stage; (cell, None, None) for a cell without a finished run."""
    for cell in results["cells"]:
        if not cell["stages"]:
            yield cell, None, None
        for stage_id, stage in cell["stages"].items():
            yield cell, stage_id, stage


def format_mean_std(stats: dict | None) -> str:
    if not stats or stats["mean"] is None:
        return "-"
    mean = format_number(percent(stats["mean"]))
    return mean if stats["std"] is None else f"{mean} ± {format_number(percent(stats['std']))}"


def format_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def format_comparison(comparison: dict | None) -> str:
    """``+1.25 [+0.10, +2.40], p=0.041`` (points); ``+1.25 (n=1)`` without a spread."""
    if not comparison or not comparison["n"]:
        return "-"
    diff = format_number(percent(comparison["mean_diff"]), signed=True)
    if comparison["ci95"] is None:
        return f"{diff} (n={comparison['n']})"
    low, high = (format_number(percent(v), signed=True) for v in comparison["ci95"])
    return f"{diff} [{low}, {high}], {format_p(comparison['p_value'])}"


def comparison_header(label: str) -> str:
    return f"Δ vs {label} (95% CI, p)"


def table_rows(results: dict) -> list[dict[str, str]]:
    """The human table: one row per cell x stage, accuracies in percent; a stage the
    grid does not change (:func:`shared_stages`) is one row first, its cell "(shared)"."""
    shared = set(results.get("shared_stages") or ())
    rows = []
    for stage_id in results.get("shared_stages") or ():
        cell = max((c for c in results["cells"] if stage_id in c["stages"]), key=lambda c: c["stages"][stage_id]["test_acc"]["n"])
        rows.append(_table_row(results, cell, stage_id, cell["stages"][stage_id], shared=True))
    for cell, stage_id, stage in stage_rows(results):
        if stage_id not in shared:
            rows.append(_table_row(results, cell, stage_id, stage))
    return _with_best_test_column(results, rows)


def has_best_test(results: dict) -> bool:
    """Whether any stage measured the literature's best-test-epoch figure (test_every_epoch)."""
    return any(stage and "best_test_acc" in stage for _, _, stage in stage_rows(results))


def _with_best_test_column(results: dict, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows with the best-test-epoch column after the validation one, only when measured."""
    if not has_best_test(results):
        return rows
    stages = {(cell["id"] or "-", stage_id): stage for cell, stage_id, stage in stage_rows(results) if stage}
    shared = {stage_id: stage for (_, stage_id), stage in stages.items()}
    placed = []
    for row in rows:
        stage = shared.get(row["stage"]) if row["cell"] == "(shared)" else stages.get((row["cell"], row["stage"]))
        text = format_mean_std((stage or {}).get("best_test_acc"))
        items = list(row.items())
        at = list(row).index("val % (mean ± std)") + 1
        placed.append(dict(items[:at] + [(BEST_TEST_COLUMN, text)] + items[at:]))
    return placed


def _table_row(results: dict, cell: dict, stage_id: str | None, stage: dict | None, *, shared: bool = False) -> dict[str, str]:
    stage = stage or {}
    row = {
        "cell": "(shared)" if shared else cell["id"] or "-",
        "stage": stage_id or "(no finished run)",
        "model": stage.get("model") or "-",
        "params": format_count(num_parameters(stage)),
        "n": str(stage["test_acc"]["n"]) if stage else "0",
        "test % (mean ± std)": format_mean_std(stage.get("test_acc")),
        "val % (mean ± std)": format_mean_std(stage.get("best_val_acc")),
    }
    for baseline in results["baselines"]:
        comparison = (stage.get("vs") or {}).get(baseline["label"])
        if shared:  # compared with itself in another cell: nothing to say
            text = "(baseline)" if baseline.get("stage") == stage_id else "(the same in every cell)"
        else:
            reference = stage_id is not None and comparison is None and is_reference(baseline, cell["id"], stage_id)
            text = "(baseline)" if reference else format_comparison(comparison)
        row[comparison_header(baseline["label"])] = text
    return row


def num_parameters(stage: dict) -> int | None:
    """A stage entry's parameter count; results.json written before 0.3.0 call it "params"."""
    return stage.get("num_parameters", stage.get("params"))


RIGHT = {"params", "n", "test % (mean ± std)", "val % (mean ± std)", BEST_TEST_COLUMN}


def head_line(results: dict) -> str:
    cells = results["cells"]
    finished = sum(len(c["seeds"]) for c in cells)
    failed = sum(len(c["failed"]) for c in cells)
    missing = sum(len(c["missing"]) for c in cells)
    seeds = ", ".join(map(str, results["seeds"]))
    return (f"{results.get('name')}: {len(cells)} cell{'s' * (len(cells) != 1)} x seeds {seeds}; "
            f"{finished} runs finished, {failed} failed, {missing} not finished")


def problem_lines(results: dict) -> list[str]:
    """A line per cell with failed runs (seed, error, log) and per cell with unfinished ones."""
    lines = []
    for cell in results["cells"]:
        for failure in cell["failed"]:
            lines.append(f"cell {cell['id'] or '-'}: seed {failure['seed']} failed: {failure['error']}"
                         + (f" (log: {failure['log']})" if failure.get("log") else ""))
        if cell["missing"]:
            lines.append(f"cell {cell['id'] or '-'}: not finished: seed {', '.join(map(str, cell['missing']))}")
    return lines


def method_rows(results: dict) -> list[dict[str, str]]:
    """One row per cell x method: the final stage's accuracy and comparisons, the
    method's total cost and time."""
    rows = []
    several_cells = len(results["cells"]) > 1
    for cell in results["cells"]:
        for entry, method in (cell.get("methods") or {}).items():
            final = cell["stages"].get(method["final_stage"]) or {}
            row = {"cell": cell["id"] or "-"} if several_cells else {}
            row |= {"method": entry, "final stage": method["final_stage"],
                    "model": final.get("model") or "-", "params": format_count(num_parameters(final)),
                    "stages": str(len(method["stages"])), "epochs": str(method["epochs"]),
                    "n": str((final.get("test_acc") or {}).get("n", 0)),
                    "test % (mean ± std)": format_mean_std(final.get("test_acc"))}
            for baseline in results["baselines"]:
                comparison = (final.get("vs") or {}).get(baseline["label"])
                itself = comparison is None and is_reference(baseline, cell["id"], method["final_stage"])
                row[f"Δ vs {baseline['label']}"] = "(baseline)" if itself else format_comparison(comparison)
            cost, time = method["train_macs"], method["time_s"]
            row["train MACs"] = format_count(cost["mean"]) if cost["mean"] is not None else "-"
            row["time"] = format_duration(time["mean"]) if time["mean"] is not None else "-"
            rows.append(row)
    return rows


def methods_table_rows(results: dict) -> list[dict[str, str]]:
    """By method (a recipe entry: its final stage, its summed cost), when a method has several stages."""
    return method_rows(results) if has_chains(results) else []


METHOD_RIGHT = {"params", "stages", "epochs", "n", "test % (mean ± std)", "train MACs", "time"}
METHODS_NOTE = ("by method: a recipe entry with all the stages its scheme planned; accuracy and Δ of its final stage; "
                "train MACs: its stages' training cost summed (student forward + backward ~ 3x forward, plus the "
                "teachers' forward passes, per training image and epoch), time: its stages' wall time summed (means over seeds).")


def format_results(results: dict) -> str:
    """The console view: a head line, the table, the note, failed and unfinished runs."""
    lines = [head_line(results), format_table(table_rows(results), right=RIGHT), _note(results)]
    methods = methods_table_rows(results)
    if methods:
        lines += ["", format_table(methods, right=METHOD_RIGHT), METHODS_NOTE]
    return "\n".join(lines + problem_lines(results))


def _note(results: dict) -> str:
    return (NOTE + (" " + SHARED_NOTE if results.get("shared_stages") else "")
            + (" " + BEST_TEST_NOTE if has_best_test(results) else ""))


def format_results_markdown(results: dict) -> str:
    problems = problem_lines(results)
    lines = [f"# {results.get('name')}", "", head_line(results), "",
             format_markdown_table(table_rows(results), right=RIGHT), "", _note(results)]
    methods = methods_table_rows(results)
    if methods:
        lines += ["", "## By method", "", format_markdown_table(methods, right=METHOD_RIGHT), "", METHODS_NOTE]
    if problems:
        lines += ["", *(f"- {line}" for line in problems)]
    return "\n".join(lines) + "\n"


def _csv_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _csv_percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def format_results_csv(results: dict) -> str:
    """One row per cell x stage: the overrides, n, mean/std of test and val accuracy,
    and per baseline the difference, its 95 % interval and p (percent, 2 decimals)."""
    keys = list(dict.fromkeys(key for cell in results["cells"] for key in cell["overrides"]))
    rows = []
    for cell, stage_id, stage in stage_rows(results):
        stage = stage or {}
        test, val = stage.get("test_acc") or {}, stage.get("best_val_acc") or {}
        row = {"cell": cell["id"], "recipe": cell["recipe"] or ""}
        row.update({key: _csv_value(cell["overrides"][key]) if key in cell["overrides"] else "" for key in keys})
        row.update({"stage": stage_id or "", "model": stage.get("model") or "", "params": num_parameters(stage) or "",
                    "n": test.get("n", 0), "failed": len(cell["failed"]),
                    "test_mean_pct": _csv_percent(test.get("mean")), "test_std_pct": _csv_percent(test.get("std")),
                    "val_mean_pct": _csv_percent(val.get("mean")), "val_std_pct": _csv_percent(val.get("std"))})
        if has_best_test(results):  # the literature's protocol, only when measured
            best = stage.get("best_test_acc") or {}
            row.update({"best_test_epoch_mean_pct": _csv_percent(best.get("mean")), "best_test_epoch_std_pct": _csv_percent(best.get("std"))})
        for baseline in results["baselines"]:
            label = baseline["label"]
            comparison = (stage.get("vs") or {}).get(label) or {}
            low, high = comparison.get("ci95") or (None, None)
            p = comparison.get("p_value")
            row.update({f"n_vs_{label}": comparison.get("n", ""), f"diff_vs_{label}_pct": _csv_percent(comparison.get("mean_diff")),
                        f"ci95_low_vs_{label}_pct": _csv_percent(low), f"ci95_high_vs_{label}_pct": _csv_percent(high),
                        f"p_vs_{label}": "" if p is None else f"{p:.4f}"})
        rows.append(row)
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def write_results(folder: str, results: dict) -> dict[str, str]:
    """Write ``results.json``, ``results.csv`` and ``results.md`` into ``folder``
    (atomically); returns their paths by file name."""
    paths = {name: os.path.join(folder, name) for name in (RESULTS_JSON, RESULTS_CSV, RESULTS_MD)}
    atomic_write_json(paths[RESULTS_JSON], results)
    atomic_write_text(paths[RESULTS_CSV], format_results_csv(results))
    atomic_write_text(paths[RESULTS_MD], format_results_markdown(results))
    return paths
