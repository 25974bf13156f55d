"""``pyramidkd run RECIPE --seeds 0,1,2``: one run per seed (``DIR/seed-N``), then
mean ± std per stage, written to ``DIR/seeds-summary.json``. ``report`` reads
such a folder back with :func:`load_seed_runs`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import statistics
from typing import Mapping, Sequence

from ..errors import RunDirectoryError, UserError
from ..formatting import format_count, format_number, format_table
from ..records import RunSummary

SEEDS_SUMMARY_FILE = "seeds-summary.json"
SEED_FOLDER = re.compile(r"seed-(-?\d+)\Z")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r} is not a comma-separated list of integers", fix="e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r} needs distinct integers", fix="e.g. --seeds 0,1,2")
    return seeds


def seed_folders(folder: str) -> dict[int, str]:
    """``seed-N`` sub-folders of a ``--seeds`` run, by seed, in seed order."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(folder), "seed-*")):
        match = SEED_FOLDER.match(os.path.basename(path))
        if match and os.path.isdir(path):
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(summaries: Mapping[int, RunSummary]) -> dict:
    """Per stage (matched by id): mean and sample std of best val and test accuracy over seeds."""
    first = next(iter(summaries.values()))
    stages = []
    for stage in first.stages:
        results = []
        for seed, summary in summaries.items():
            result = summary.stage(stage.stage)
            if result is None:
                raise UserError(f"the run of seed {seed} has no stage {stage.stage!r}: the seeds ran different recipes",
                                fix="aggregate runs of one recipe (pyramidkd run RECIPE --seeds ...)")
            results.append(result)
        tests = [r.test_acc for r in results]
        test_mean, test_std = _mean_std(tests)
        val_mean, val_std = _mean_std([r.best_val_acc for r in results])
        stages.append({
            "stage": stage.stage, "model": stage.model, "params": stage.params,
            "test_acc_mean": test_mean, "test_acc_std": test_std, "val_acc_mean": val_mean, "val_acc_std": val_std,
            "test_acc": tests, "reference_test_acc": stage.reference_test_acc,
        })
    return {"experiment": first.experiment, "seeds": list(summaries), "stages": stages}


def _mean_std_text(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def aggregate_rows(result: Mapping) -> list[dict[str, str]]:
    return [{
        "stage": s["stage"], "model": s["model"], "params": format_count(s["params"]),
        "val % (mean ± std)": _mean_std_text(s["val_acc_mean"], s["val_acc_std"]),
        "test % (mean ± std)": _mean_std_text(s["test_acc_mean"], s["test_acc_std"]),
        "published %": format_number(s["reference_test_acc"]),
    } for s in result["stages"]]


def format_aggregate(result: Mapping) -> str:
    head = f"{result['experiment']} over seeds {', '.join(map(str, result['seeds']))} (std: sample standard deviation)"
    return head + "\n" + format_table(aggregate_rows(result))


def run_seeds(recipe_path: str, overrides: Sequence[str], seeds: list[int], *, output: str | None, quiet: bool, force: bool,
              resume: bool, max_epochs: int | None = None) -> int:
    """A one-cell sweep (:mod:`pyramidkd.engine.sweeps`) with the runs in ``DIR/seed-N``,
    one at a time on this machine; then the mean ± std table. Returns the exit code."""
    import io

    from ..components import ComponentSpec
    from ..host import make_plugin_host
    from ..recipe import format_key_path, load_recipe, parse_override
    from ..rundir import atomic_write_json, default_output_dir
    from ..sweeps.folder import SweepFolder
    from ..sweeps.spec import SweepCell, SweepPlan, safe_id
    from ..sweeps.sweep import check_cells, execute, plan_runs
    from .sweep import finish

    name = load_recipe(recipe_path, list(overrides)).experiment.name
    folder = SweepFolder(output or default_output_dir(name))
    if resume and not os.path.isdir(folder.path):
        raise RunDirectoryError("there is no run to resume here", file=folder.path, fix="check --output, or drop --resume")
    values = {}
    for text in overrides:
        parts, value = parse_override(text)
        values[format_key_path(parts)] = value
    cell = SweepCell(safe_id(name), recipe_path, os.path.abspath(recipe_path), values, "")
    local = make_plugin_host().registry("launcher").get("local")
    plan = SweepPlan(name, recipe_path, list(seeds), [cell], [], ComponentSpec(local, local.Params(workers=1), "--seeds"))
    runs = plan_runs(plan, folder, check_cells(plan, max_epochs))
    outcome = execute(plan, folder, runs, force=force, max_epochs=max_epochs, seeds_only=True,
                      stream=io.StringIO() if quiet else None)
    code = finish(outcome, show_results=False)
    summaries = {}
    for seed, path in seed_folders(folder.path).items():
        if seed in seeds and os.path.exists(os.path.join(path, "summary.json")):
            with open(os.path.join(path, "summary.json"), encoding="utf-8") as handle:
                summaries[seed] = RunSummary.from_dict(json.load(handle))
    if summaries:
        result = aggregate(summaries)
        atomic_write_json(os.path.join(folder.path, SEEDS_SUMMARY_FILE), result)
        print(format_aggregate(result))
    print(f"results: {folder.path}")
    return code


def load_seed_runs(folder: str, read_summary) -> tuple[dict[int, str], dict[int, RunSummary], list[str]]:
    """The finished runs of a ``--seeds`` folder: run folders and summaries by seed,
    and notes on the seed folders left out (no summary.json: unfinished).
    ``read_summary(run_dir)`` reads one run's summary (the report's reader)."""
    folders, summaries, notes = {}, {}, []
    for seed, path in seed_folders(folder).items():
        if not os.path.exists(os.path.join(path, "summary.json")):
            notes.append(f"{os.path.basename(path)}: no summary.json (unfinished run): left out")
            continue
        folders[seed], summaries[seed] = path, read_summary(path)
    if not summaries:
        raise RunDirectoryError("holds seed-N folders but no finished run in them", file=folder,
                                fix="finish the runs: pyramidkd run RECIPE --seeds ... --output DIR --resume")
    return folders, summaries, notes
