"""The report of a sweep folder (one holding ``sweep.json``).

It prints the sweep's table (:func:`..sweeps.results.format_results`: per cell and
stage, mean ± std over the seeds and the paired comparisons with the baselines),
(re)writes ``DIR/results.json``, ``results.csv`` and ``results.md``, and draws
``DIR/plots/<stage>.png``: the stage's test accuracy per cell, mean with a std
error bar, each seed a dot.

The folder ``run --seeds`` writes is a sweep of one cell whose runs lie in
``DIR/seed-N``: it keeps the seeds report (:mod:`.seeds_report`: MACs, published
references, the seeds' training curves overlaid), with the failed runs as notes.
"""

from __future__ import annotations

import os
from typing import Mapping

from ..sweeps.methods import has_chains
from ..sweeps.results import collect_results, format_results, read_sweep, write_results
from .readers import Hosts, plot_file
from .seeds_report import build_seeds_report

COST_PLOT = "accuracy-vs-cost"


def build_sweep_report(folder: str, *, hosts: Hosts, plots: bool = True) -> dict:
    """The report of a sweep folder (a dict, as ``--format json`` prints it); writes
    the results files and the plots."""
    folder = os.path.abspath(folder)
    results = collect_results(folder)
    files = write_results(folder, results)
    cells = read_sweep(folder)["cells"]
    if len(cells) == 1 and not cells[0].get("folder") and results["cells"][0]["seeds"]:  # `run --seeds`
        report = build_seeds_report(folder, hosts=hosts, plots=plots, cell=results["cells"][0])
        report["notes"] += [f"seed {f['seed']} failed: {f['error']}" + (f" (log: {f['log']})" if f.get("log") else "")
                            for f in results["cells"][0]["failed"]]
        report["results_files"] = files
        return report
    report = {"kind": "sweep", "run_dir": folder, "results": results, "results_files": files, "plots": {}, "notes": []}
    if plots:
        _draw(report)
    return report


def _draw(report: dict) -> None:
    """A plot per stage and, when a method has several stages, accuracy against training cost."""
    from .plots import plot_accuracy_vs_cost, plot_sweep_stage, save

    folder, results = report["run_dir"], report["results"]
    stage_ids = dict.fromkeys(stage_id for cell in results["cells"] for stage_id in cell["stages"])
    for stage_id in stage_ids:
        path = plot_file(folder, stage_id)
        save(plot_sweep_stage(results, stage_id), path)
        report["plots"][stage_id] = path
    if has_chains(results):
        path = plot_file(folder, COST_PLOT)
        save(plot_accuracy_vs_cost(results), path)
        report["plots"][COST_PLOT] = path


def format_sweep_report(report: Mapping) -> str:
    """The sweep's table, then where the plots and the results files are."""
    folder = report["run_dir"]
    lines = [format_results(report["results"])]
    if report["plots"]:
        lines += ["", "Plots (in the sweep folder): "
                  + ", ".join(f"[{stage}]({os.path.relpath(path, folder)})" for stage, path in report["plots"].items())]
    lines += ["", "Results: " + ", ".join(os.path.relpath(p, folder) for p in report["results_files"].values())]
    return "\n".join(lines + [f"\nnote: {note}" for note in report["notes"]])
