"""A search's results: the best trial's values, a table of every trial
(``results.json``, ``.csv``, ``.md``), Optuna's history and importance plots
(PNG), and the final re-run's **test** accuracy on fresh seeds — the only test
figure a search reports, so it is never a test-selected one.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from typing import Any

from ..formatting import format_markdown_table, format_number, format_table, percent
from ..rundir import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..sweeps.results import format_mean_std
from .spec import SearchPlan

RESULTS_JSON, RESULTS_CSV, RESULTS_MD = "results.json", "results.csv", "results.md"
PLOTS = "plots"
HISTORY_PNG, IMPORTANCE_PNG = "history.png", "importance.png"


def collect_results(study, plan: SearchPlan, folder, final: dict | None) -> dict[str, Any]:
    """Every trial of the study, the best one and the final re-run, as plain data."""
    from optuna.trial import TrialState

    trials = []
    for trial in study.get_trials(deepcopy=False):
        last = max(trial.intermediate_values) if trial.intermediate_values else None
        trials.append({
            "number": trial.number, "state": trial.state.name.lower(),
            "values": {p.key: p.tidy(trial.params.get(p.key)) for p in plan.space},
            "value": trial.value if trial.state == TrialState.COMPLETE else None, "scores": trial.user_attrs.get("scores", {}),
            "epochs_reported": len(trial.intermediate_values),
            "last_val_acc": trial.intermediate_values[last] if last is not None else None,
            "folder": f"trial-{trial.number}",
        })
    counts = {state: sum(t["state"] == state for t in trials) for state in ("complete", "pruned", "fail", "running")}
    best = None
    if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        chosen = study.best_trial
        best = next(t for t in trials if t["number"] == chosen.number)
    return {"format": 1, "search": plan.name, "file": os.path.abspath(plan.file), "recipe": plan.recipe_path,
            "metric": plan.section.metric, "stage": plan.stage, "direction": plan.section.direction, "seeds": plan.seeds,
            "sampler": plan.section.sampler, "pruner": plan.section.pruner, "space": [p.to_dict() for p in plan.space],
            "counts": counts, "trials": trials, "best": best, "final": final}


def _percent(value: float | None) -> str:
    return format_number(percent(value))


def trial_rows(results: dict) -> list[dict[str, str]]:
    keys = [p["key"] for p in results["space"]]
    short = _short_keys(keys)
    rows = []
    for trial in results["trials"]:
        row = {"trial": str(trial["number"]), "state": trial["state"]}
        row.update({short[k]: _value(trial["values"].get(k)) for k in keys})
        row[f"{results['metric']} %"] = _percent(trial["value"])
        row["note"] = (f"pruned after epoch {trial['epochs_reported']} (val {_percent(trial['last_val_acc'])})"
                       if trial["state"] == "pruned" else "")
        rows.append(row)
    return rows


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The last part of each key path, or the whole path where two would read alike."""
    lasts = {key: key.rsplit(".", 1)[-1] for key in keys}
    return {key: last if list(lasts.values()).count(last) == 1 else key for key, last in lasts.items()}


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def best_lines(results: dict) -> list[str]:
    best, metric = results["best"], results["metric"]
    if best is None:
        return ["no trial has finished yet"]
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines = [f"best trial: {best['number']} — {metric} of stage {results['stage']!r} (validation, mean over seeds {seeds}): "
             f"{_percent(best['value'])} %"]
    lines += [f"  {key} = {_value(value)}" for key, value in best["values"].items()]
    return lines


def final_lines(results: dict) -> list[str]:
    final = results["final"]
    if final is None:
        return ["final: no re-run on fresh seeds (final_seeds = [], or no trial finished)"]
    seeds = ", ".join(str(s) for s in final["seeds"])
    lines = [f"final (the figure to report): trial {final['trial']}'s values re-run on fresh seeds {seeds}, which the search "
             f"never used — TEST accuracy of stage {final['stage']!r}: {format_mean_std(final['test_acc'])} % "
             f"(n = {final['test_acc']['n']}); validation {format_mean_std(final['best_val_acc'])} %"]
    lines += [f"  seed {seed} failed: {why}" for seed, why in final["failed"].items()]
    return lines


def head_line(results: dict) -> str:
    counts = results["counts"]
    return (f"search {results['search']}: {len(results['trials'])} trial(s) — {counts['complete']} complete, "
            f"{counts['pruned']} pruned, {counts['fail']} failed" + (f", {counts['running']} unfinished" if counts["running"] else ""))


def format_results(results: dict) -> str:
    """The text the command prints."""
    return "\n".join([head_line(results), "", format_table(trial_rows(results), right=(f"{results['metric']} %",)), "",
                      *best_lines(results), "", *final_lines(results)])


def format_results_markdown(results: dict) -> str:
    metric = results["metric"]
    lines = [f"# Search {results['search']}", "", head_line(results) + ".", "",
             f"Trials are selected on **validation** accuracy ({metric} of stage `{results['stage']}`, "
             f"{results['direction']}, the mean over seeds {results['seeds']}); test accuracy appears only for the final "
             "re-run on fresh seeds.", "", "## Best trial", "", *best_lines(results), "", "## Final re-run (test accuracy)", "",
             *final_lines(results), "", "## All trials", "", format_markdown_table(trial_rows(results), right=(f"{metric} %",))]
    plots = [name for name in (HISTORY_PNG, IMPORTANCE_PNG) if name in results.get("plots", [])]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name[:-4]}]({PLOTS}/{name})" for name in plots]
    return "\n".join(lines) + "\n"


def format_results_csv(results: dict) -> str:
    keys = [p["key"] for p in results["space"]]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    seeds = results["seeds"]
    writer.writerow(["trial", "state", *keys, f"{results['metric']}_pct", *(f"seed_{s}_pct" for s in seeds),
                     "epochs_reported", "last_val_acc_pct", "folder"])
    for trial in results["trials"]:
        scores = trial["scores"]
        writer.writerow([trial["number"], trial["state"], *(trial["values"].get(k) for k in keys), _csv(trial["value"]),
                         *(_csv(scores.get(str(s))) for s in seeds), trial["epochs_reported"], _csv(trial["last_val_acc"]),
                         trial["folder"]])
    return buffer.getvalue()


def _csv(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.4f}"


def write_plots(folder: str, study) -> dict[str, str]:
    """Optuna's optimisation history and parameter importances (matplotlib), as PNG;
    a plot that cannot be drawn yet (importances need two finished trials) is
    left out with the reason."""
    from optuna.visualization import matplotlib as plots

    os.makedirs(os.path.join(folder, PLOTS), exist_ok=True)
    notes = {}
    for name, draw in ((HISTORY_PNG, plots.plot_optimization_history), (IMPORTANCE_PNG, plots.plot_param_importances)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-API and equal-importance notes
            try:
                axes = draw(study)
            except (ValueError, RuntimeError) as error:
                notes[name] = f"not drawn: {error}"
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as pyplot

        pyplot.close(figure)
        atomic_write_bytes(os.path.join(folder, PLOTS, name), buffer.getvalue())
        notes[name] = "ok"
    return notes


def write_results(folder: str, results: dict, study) -> dict[str, str]:
    """``results.json``, ``.csv``, ``.md`` and the plots; the paths written."""
    complete = results["counts"]["complete"]
    notes = write_plots(folder, study) if complete else {}
    results["plots"] = [name for name, note in notes.items() if note == "ok"]
    results["plot_notes"] = {name: note for name, note in notes.items() if note != "ok"}
    paths = {name: os.path.join(folder, name) for name in (RESULTS_JSON, RESULTS_CSV, RESULTS_MD)}
    atomic_write_json(paths[RESULTS_JSON], results)
    atomic_write_text(paths[RESULTS_CSV], format_results_csv(results))
    atomic_write_text(paths[RESULTS_MD], format_results_markdown(results))
    return paths
