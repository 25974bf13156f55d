"""``pyramidkd report DIR`` on a ``run --seeds`` folder (``DIR/seed-N/...``).

One table for the folder: per stage, mean ± std (sample) of the best validation
and the test accuracy over the finished seeds, each seed's test accuracy, the
published reference and the difference of the mean from it; MACs come from the
first seed's checkpoints (every seed trains the same models). Plots go to
``DIR/plots/<stage>.png``: the stage's training curves, one line per seed.
"""

from __future__ import annotations

import os

from ..errors import UserError
from ..formatting import format_count, format_number, percent
from ..rundir import SUMMARY_FILE
from .report import Hosts, load_epoch_records, load_summary, markdown_block, plot_file, stage_macs
from .seeds import aggregate, load_seed_runs, seed_folders

SEEDS_NOTE = ("mean ± std over the seeds (std: sample standard deviation); best val % chooses each seed's checkpoint; "
              "MACs: one image, conv + linear layers.")


def is_seeds_folder(path: str) -> bool:
    """A folder written by ``run --seeds``: no summary of its own, ``seed-N`` runs inside."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, SUMMARY_FILE)):
        return False
    return bool(seed_folders(path))


def build_seeds_report(folder: str, *, hosts: Hosts, plots: bool = True) -> dict:
    """The report of a ``--seeds`` folder (a dict, as ``--format json`` prints it); writes the plots."""
    from .plots import plot_seed_curves, save

    folders, summaries, notes = load_seed_runs(folder, load_summary)
    try:
        aggregated = aggregate(summaries)
    except UserError as error:
        raise UserError(error.message, file=folder, fix=error.fix) from None
    first_seed = next(iter(summaries))
    first = summaries[first_seed]
    host = hosts.for_run(folders[first_seed], first) if first.stages else None
    stages = []
    for row in aggregated["stages"]:
        result = first.stage(row["stage"])
        macs, problem = stage_macs(folders[first_seed], result, host)
        if problem:
            notes.append(f"seed {first_seed}: {problem}")
        mean = percent(row["test_acc_mean"])
        reference = row["reference_test_acc"]
        stages.append({
            "stage": row["stage"],
            "entry": result.entry or result.stage,
            "model": row["model"],
            "loss": result.loss,
            "params": row["params"],
            "macs": macs,
            "val_acc_mean_pct": percent(row["val_acc_mean"]),
            "val_acc_std_pct": percent(row["val_acc_std"]),
            "test_acc_mean_pct": mean,
            "test_acc_std_pct": percent(row["test_acc_std"]),
            "test_acc_pct": {str(seed): percent(value) for seed, value in zip(summaries, row["test_acc"])},
            "reference_test_acc_pct": reference,
            "difference_pct": None if reference is None else mean - reference,
            "curves": None,
        })
    report = {
        "kind": "seeds",
        "run_dir": folder,
        "experiment": first.experiment,
        "dataset": first.dataset.to_dict(),
        "seeds": list(summaries),
        "runs": {str(seed): path for seed, path in folders.items()},
        "device": first.device,
        "stages": stages,
        "accuracy_vs_params": None,
        "notes": notes,
    }
    if plots:
        records = {seed: load_epoch_records(path) for seed, path in folders.items()}
        for seed, found in records.items():
            if found is None:
                notes.append(f"seed {seed}: no metrics.jsonl (the files logger was off): no training curves of it")
        for stage in stages:
            histories = {seed: found[stage["stage"]] for seed, found in records.items() if found and found.get(stage["stage"])}
            if histories:
                stage["curves"] = plot_file(folder, stage["stage"])
                save(plot_seed_curves(stage, histories), stage["curves"])
            elif any(found is not None for found in records.values()):
                notes.append(f"stage {stage['stage']!r}: no epoch records in any seed's metrics.jsonl: no training curves")
    return report


def format_seeds_markdown(report: dict) -> str:
    rows = [{
        "stage": s["stage"], "model": s.get("model"), "params": format_count(s.get("params")), "MACs": format_count(s.get("macs")),
        "val % (mean ± std)": f"{format_number(s['val_acc_mean_pct'])} ± {format_number(s['val_acc_std_pct'])}",
        "test % (mean ± std)": f"{format_number(s['test_acc_mean_pct'])} ± {format_number(s['test_acc_std_pct'])}",
        "test % per seed": ", ".join(format_number(v) for v in s["test_acc_pct"].values()),
        "published %": format_number(s["reference_test_acc_pct"]),
        "Δ mean − published": format_number(s["difference_pct"], signed=True),
    } for s in report["stages"]]
    seeds = ", ".join(map(str, report["seeds"]))
    return markdown_block(report, f"## {report.get('experiment')} over seeds {seeds}", f"{len(report['seeds'])} seeds ({seeds})",
                          rows, SEEDS_NOTE)
