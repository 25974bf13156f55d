"""``pyramidkd run RECIPE --seeds 0,1,2``: one run per seed, then mean ± std per stage."""

from __future__ import annotations

import os
import statistics

from .errors import UserError
from .recipe import load_recipe
from .rundir import atomic_write_json, default_output_dir
from .summary import format_table


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r} is not a comma-separated list of integers", fix="e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r} needs distinct integers", fix="e.g. --seeds 0,1,2")
    return seeds


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(summaries: dict[int, dict]) -> dict:
    """Per stage: mean and sample std of best val and test accuracy over seeds."""
    first = next(iter(summaries.values()))
    stages = []
    for index, stage in enumerate(first["stages"]):
        tests = [s["stages"][index]["test_acc"] for s in summaries.values()]
        vals = [s["stages"][index]["best_val_acc"] for s in summaries.values()]
        test_mean, test_std = _mean_std(tests)
        val_mean, val_std = _mean_std(vals)
        stages.append({
            "stage": stage["stage"], "model": stage["model"], "params": stage["params"],
            "test_acc_mean": test_mean, "test_acc_std": test_std, "val_acc_mean": val_mean, "val_acc_std": val_std,
            "test_acc": tests, "reference_test_acc": stage.get("reference_test_acc"),
        })
    return {"experiment": first["experiment"], "seeds": list(summaries), "stages": stages}


def format_aggregate(result: dict) -> str:
    rows = [{
        "stage": s["stage"], "model": s["model"], "params": str(s["params"]),
        "val % (mean ± std)": f"{100 * s['val_acc_mean']:.2f} ± {100 * s['val_acc_std']:.2f}",
        "test % (mean ± std)": f"{100 * s['test_acc_mean']:.2f} ± {100 * s['test_acc_std']:.2f}",
        "published %": "-" if s["reference_test_acc"] is None else f"{s['reference_test_acc']:.2f}",
    } for s in result["stages"]]
    return f"{result['experiment']} over seeds {', '.join(map(str, result['seeds']))} (std: sample standard deviation)\n" + format_table(rows)


def run_seeds(recipe_path: str, overrides, seeds: list[int], *, output: str | None, quiet: bool, force: bool, resume: bool) -> dict:
    from .runner import run_recipe

    name = load_recipe(recipe_path, overrides).experiment.name
    folder = output or default_output_dir(name)
    summaries = {}
    for seed in seeds:
        summaries[seed] = run_recipe(recipe_path, [*overrides, f"experiment.seed={seed}"], output=os.path.join(folder, f"seed-{seed}"),
                                     quiet=quiet, force=force, resume=resume)
    result = aggregate(summaries)
    atomic_write_json(os.path.join(folder, "seeds-summary.json"), result)
    print(format_aggregate(result))
    print(f"results: {os.path.abspath(folder)}")
    return result
