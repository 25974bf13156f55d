"""The report of a ``run --seeds`` folder (``DIR/seed-N/...``).

One table for the folder: per stage, mean ± std (sample) of the best validation
and the test accuracy over the finished seeds (the sweep's statistics,
:func:`pyramidkd.engine.sweeps.results.aggregate_stages`), each seed's test
accuracy, the published reference and the difference of the mean from it; MACs
come from the first seed's checkpoints (every seed trains the same models). Plots
go to ``DIR/plots/<stage>.png``: the stage's training curves, one line per seed.
"""

from __future__ import annotations

import os

from ..formatting import format_count, format_number, format_table, percent
from ..records import RunSummary, has_summary
from ..sweeps.results import aggregate_stages, format_mean_std
from ..sweeps.seeds import load_seed_runs, seed_folders
from .markdown import markdown_block, mean_std_text
from .run_report import BEST_TEST_COLUMN, BEST_TEST_NOTE
from .readers import METRICS_FILE, Hosts, load_epoch_records, plot_file, stage_macs

SEEDS_NOTE = ("mean ± std over the seeds (std: sample standard deviation); best val % chooses each seed's checkpoint; "
              "MACs: one image, conv + linear layers.")


def is_seeds_folder(path: str) -> bool:
    """A folder written by ``run --seeds``: no summary of its own, ``seed-N`` runs inside."""
    if not os.path.isdir(path) or has_summary(path):
        return False
    return bool(seed_folders(path))


def build_seeds_report(folder: str, *, hosts: Hosts, plots: bool = True, cell: dict | None = None) -> dict:
    """The report of a ``--seeds`` folder (a dict, as ``--format json`` prints it); writes
    the plots. ``cell``: the folder's aggregate (its ``results.json`` cell) when the
    caller has it; else the finished seed folders are aggregated here."""
    folders, summaries, notes = load_seed_runs(folder)
    if cell is None:
        cell = {"seeds": list(summaries), "stages": aggregate_stages(summaries)}
    folders = {seed: folders[seed] for seed in cell["seeds"] if seed in folders}
    summaries = {seed: summaries[seed] for seed in folders}
    first = summaries[next(iter(summaries))]
    report = {
        "kind": "seeds",
        "run_dir": folder,
        "experiment": first.experiment,
        "dataset": first.dataset.to_dict(),
        "seeds": list(summaries),
        "runs": {str(seed): path for seed, path in folders.items()},
        "device": first.device,
        "stages": [_stage_row(stage_id, stage, cell["seeds"], folders, summaries, hosts, notes)
                   for stage_id, stage in cell["stages"].items()],
        "accuracy_vs_params": None,
        "notes": notes,
    }
    if plots:
        _draw(report, folders)
    return report


def _stage_row(stage_id: str, stage: dict, seeds: list[int], folders: dict[int, str], summaries: dict[int, RunSummary],
               hosts: Hosts, notes: list[str]) -> dict:
    """One stage's row; its MACs from the first seed that ran it."""
    seed = next(s for s, summary in summaries.items() if summary.stage(stage_id) is not None)
    result = summaries[seed].stage(stage_id)
    macs, problem = stage_macs(folders[seed], result, hosts.for_run(folders[seed], summaries[seed]))
    if problem:
        notes.append(f"seed {seed}: {problem}")
    mean = percent(stage["test_acc"]["mean"])
    reference = stage.get("reference_test_acc", result.reference_test_acc)
    row = {
        "stage": stage_id,
        "entry": result.entry or result.stage,
        "model": stage["model"],
        "loss": result.loss,
        "num_parameters": stage["num_parameters"],
        "macs": macs,
        "val_acc_mean_pct": percent(stage["best_val_acc"]["mean"]),
        "val_acc_std_pct": percent(stage["best_val_acc"]["std"]),
        "test_acc_mean_pct": mean,
        "test_acc_std_pct": percent(stage["test_acc"]["std"]),
        "test_acc_pct": {str(s): percent(value) for s, value in zip(seeds, stage["test_acc"]["values"]) if s in folders},
        "reference_test_acc_pct": reference,
        "difference_pct": None if reference is None or mean is None else mean - reference,
        "curves": None,
    }
    if "best_test_acc" in stage:  # only where measured (test_every_epoch)
        row["best_test_acc_mean_pct"] = percent(stage["best_test_acc"]["mean"])
        row["best_test_acc_std_pct"] = percent(stage["best_test_acc"]["std"])
    return row


def _draw(report: dict, folders: dict[int, str]) -> None:
    """Each stage's training curves, one line per seed."""
    from .plots import plot_seed_curves, save

    notes = report["notes"]
    records = {seed: load_epoch_records(path) for seed, path in folders.items()}
    for seed, found in records.items():
        if found is None:
            notes.append(f"seed {seed}: no {METRICS_FILE} (the files logger was off): no training curves of it")
    for stage in report["stages"]:
        histories = {seed: found[stage["stage"]] for seed, found in records.items() if found and found.get(stage["stage"])}
        if histories:
            stage["curves"] = plot_file(report["run_dir"], stage["stage"])
            save(plot_seed_curves(stage, histories), stage["curves"])
        elif any(found is not None for found in records.values()):
            notes.append(f"stage {stage['stage']!r}: no epoch records in any seed's {METRICS_FILE}: no training curves")


def format_seeds_markdown(report: dict) -> str:
    rows = [{
        "stage": s["stage"], "model": s.get("model"), "params": format_count(s.get("num_parameters")),
        "MACs": format_count(s.get("macs")),
        "val % (mean ± std)": mean_std_text(s["val_acc_mean_pct"], s["val_acc_std_pct"]),
        "test % (mean ± std)": mean_std_text(s["test_acc_mean_pct"], s["test_acc_std_pct"]),
        "test % per seed": ", ".join(format_number(v) for v in s["test_acc_pct"].values()),
        "published %": format_number(s["reference_test_acc_pct"]),
        "Δ mean − published": format_number(s["difference_pct"], signed=True),
    } for s in report["stages"]]
    note = SEEDS_NOTE
    if any("best_test_acc_mean_pct" in s for s in report["stages"]):  # the literature's protocol, only when measured
        rows = [{**row, BEST_TEST_COLUMN: mean_std_text(s.get("best_test_acc_mean_pct"), s.get("best_test_acc_std_pct"))}
                for row, s in zip(rows, report["stages"])]
        note += " " + BEST_TEST_NOTE
    seeds = ", ".join(map(str, report["seeds"]))
    return markdown_block(report, f"## {report.get('experiment')} over seeds {seeds}", f"{len(report['seeds'])} seeds ({seeds})",
                          rows, note)


def format_seeds_table(results: dict) -> str:
    """What ``run --seeds`` prints at the end: its results (one cell), per stage
    mean ± std of the validation and test accuracy over the finished seeds."""
    cell = results["cells"][0]
    head = f"{results['name']} over seeds {', '.join(map(str, cell['seeds']))} (std: sample standard deviation)"
    rows = [{
        "stage": stage_id, "model": stage["model"], "params": format_count(stage["num_parameters"]),
        "val % (mean ± std)": format_mean_std(stage["best_val_acc"]),
        "test % (mean ± std)": format_mean_std(stage["test_acc"]),
        "published %": format_number(stage.get("reference_test_acc")),
    } for stage_id, stage in cell["stages"].items()]
    return head + "\n" + format_table(rows)
