"""``pyramidkd report DIR`` on a sweep folder (one holding ``sweep.json``).

It prints the sweep's table (:func:`..sweeps.results.format_results`: per cell and
stage, mean ± std over the seeds and the paired comparisons with the baselines),
(re)writes ``DIR/results.json``, ``results.csv`` and ``results.md``, and draws
``DIR/plots/<stage>.png``: the stage's test accuracy per cell, mean with a std
error bar, each seed a dot.

The folder ``run --seeds`` writes is a sweep of one cell whose runs lie in
``DIR/seed-N``: it keeps the seeds report (:mod:`.report_seeds`: MACs, published
references, the seeds' training curves overlaid), with the failed runs as notes.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from ..formatting import format_count, percent
from ..sweeps.methods import has_chains
from ..sweeps.results import collect_results, format_results, write_results
from .report import Hosts, plot_file

COST_PLOT = "accuracy-vs-cost"
SEED_OFFSET, SEED_SPREAD = 0.22, 0.05  # seed dots right of the mean (in cells), apart from each other


def build_sweep_report(folder: str, *, hosts: Hosts, plots: bool = True) -> dict:
    """The report of a sweep folder (a dict, as ``--format json`` prints it); writes
    the results files and the plots."""
    from ..sweeps.results import read_sweep
    from .plots import save
    from .report_seeds import build_seeds_report

    folder = os.path.abspath(folder)
    results = collect_results(folder)
    files = write_results(folder, results)
    failures = [f"seed {f['seed']} failed: {f['error']}" + (f" (log: {f['log']})" if f.get("log") else "")
                for cell in results["cells"] for f in cell["failed"]]
    cells = read_sweep(folder)["cells"]
    if len(cells) == 1 and not cells[0].get("folder") and results["cells"][0]["seeds"]:  # `run --seeds`
        report = build_seeds_report(folder, hosts=hosts, plots=plots)
        report["notes"] += failures
        report["results_files"] = files
        return report
    report = {"kind": "sweep", "run_dir": folder, "results": results, "results_files": files, "plots": {}, "notes": []}
    if plots:
        stage_ids = dict.fromkeys(stage_id for cell in results["cells"] for stage_id in cell["stages"])
        for stage_id in stage_ids:
            path = plot_file(folder, stage_id)
            save(plot_sweep_stage(results, stage_id), path)
            report["plots"][stage_id] = path
        if has_chains(results):
            path = plot_file(folder, COST_PLOT)
            save(plot_accuracy_vs_cost(results), path)
            report["plots"][COST_PLOT] = path
    return report


def plot_accuracy_vs_cost(results: dict):
    """Each method's final test accuracy (%) against its total training MACs (log
    scale), mean with std error bars on both axes: what each method's accuracy cost."""
    from .plots import figure

    drawing = figure(9.0, 5.6)
    axes = drawing.subplots()
    colors = matplotlib_colors(sum(len(cell.get("methods") or {}) for cell in results["cells"]))
    several_cells = len(results["cells"]) > 1
    placed: list[tuple[float, float]] = []
    for cell in results["cells"]:
        for entry, method in (cell.get("methods") or {}).items():
            final = cell["stages"].get(method["final_stage"])
            cost = method["train_macs"]
            if not final or final["test_acc"]["mean"] is None or cost["mean"] is None:
                continue
            label = f"{cell['id']}: {entry}" if several_cells else entry
            x, y = cost["mean"], percent(final["test_acc"]["mean"])
            axes.errorbar([x], [y], xerr=[cost["std"] or 0.0], yerr=[percent(final["test_acc"]["std"]) or 0.0], fmt="o",
                          capsize=4, color=next(colors))
            # Labels instead of a legend; a label near an earlier one moves down a line.
            near = sum(abs(math.log10(x) - px) < 0.08 and abs(y - py) < 2.0 for px, py in placed)
            placed.append((math.log10(x), y))
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(7, 3 - 11 * near), fontsize="small")
    axes.set_xscale("log")
    axes.set(xlabel="training cost of the method's own stages (MACs, log scale)", ylabel="final test accuracy (%)",
             title=f"{results.get('name')}: accuracy vs training cost (mean ± std over seeds)")
    axes.grid(True, alpha=0.3)
    drawing.tight_layout()
    return drawing


def _baseline_mean(results: dict, stage_id: str) -> tuple[str, float] | None:
    """The first baseline naming a cell whose ``stage_id`` has a mean: (label, mean %)."""
    by_id = {cell["id"]: cell for cell in results["cells"]}
    for baseline in results["baselines"]:
        cell = by_id.get(baseline.get("cell"))
        stage = cell["stages"].get(baseline.get("stage") or stage_id) if cell else None
        if stage and stage["test_acc"]["mean"] is not None:
            return baseline["label"], percent(stage["test_acc"]["mean"])
    return None


def plot_sweep_stage(results: dict, stage_id: str):
    """One stage's test accuracy (%) per cell: the mean with a std error bar, each
    seed a dot beside it, the first baseline cell's mean a dashed line."""
    from .plots import figure

    entries = [(cell["id"] or "-", cell["stages"][stage_id]["test_acc"])
               for cell in results["cells"] if stage_id in cell["stages"]]
    drawing = figure(max(5.0, 2.0 + 0.9 * len(entries)), 4.4)
    axes = drawing.subplots()
    positions = list(range(len(entries)))
    means = [percent(stats["mean"]) for _, stats in entries]
    spreads = [percent(stats["std"]) or 0.0 for _, stats in entries]
    axes.errorbar(positions, means, yerr=spreads, fmt="o", markersize=7, capsize=5, label="mean ± std", zorder=3)
    for position, (_, stats) in zip(positions, entries):
        values = [percent(v) for v in stats["values"] if v is not None]
        offsets = _spread(len(values))
        axes.plot([position + o for o in offsets], values, marker=".", linestyle="none", color="gray", alpha=0.7,
                  label="seeds" if position == 0 else None)
    baseline = _baseline_mean(results, stage_id)
    if baseline:
        axes.axhline(baseline[1], linestyle="--", color="tab:red", alpha=0.6, label=f"baseline {baseline[0]}")
    axes.set_xticks(positions, [label for label, _ in entries], rotation=30, ha="right", fontsize="small")
    axes.set_xlim(-0.6, len(entries) - 0.4)
    axes.set(ylabel="test accuracy (%)", title=_title(results, stage_id))
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    drawing.tight_layout()  # room for the cell labels, however long
    return drawing


def matplotlib_colors(count: int):
    """``count`` distinct colours (tab10, or tab20 beyond ten), one after another."""
    from matplotlib import colormaps

    if count <= 10:
        palette = colormaps["tab10"].colors
    else:  # tab20's dark shades first
        tab20 = colormaps["tab20"].colors
        palette = tab20[0::2] + tab20[1::2]
    return iter(palette[i % len(palette)] for i in range(max(count, 1)))


def _spread(count: int) -> Sequence[float]:
    """Offsets right of the mean marker, so that the seed dots hide neither it nor each other."""
    return [SEED_OFFSET + SEED_SPREAD * i for i in range(count)]


def _title(results: dict, stage_id: str) -> str:
    first = next(cell["stages"][stage_id] for cell in results["cells"] if stage_id in cell["stages"])
    return f"{results.get('name')}: {stage_id} ({first['model']}, {format_count(first['params'])} params)"


def format_sweep_report(report: Mapping) -> str:
    """The sweep's table, then where the plots and the results files are."""
    folder = report["run_dir"]
    lines = [format_results(report["results"])]
    if report["plots"]:
        lines += ["", "Plots (in the sweep folder): "
                  + ", ".join(f"[{stage}]({os.path.relpath(path, folder)})" for stage, path in report["plots"].items())]
    lines += ["", "Results: " + ", ".join(os.path.relpath(p, folder) for p in report["results_files"].values())]
    return "\n".join(lines + [f"\nnote: {note}" for note in report["notes"]])
