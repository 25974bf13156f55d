"""``pyramidkd report RUN_DIR...``: tables and plots of finished runs.

For each run directory it reads ``summary.json`` (one result per stage) and
``metrics.jsonl`` (one record per epoch), rebuilds every stage's best model from
its checkpoint to count MACs, and writes into ``RUN_DIR/plots/``:

* ``<stage>.png``: training curves (train/val accuracy and loss vs epoch);
* ``accuracy_vs_params.png``: test accuracy against parameter count, for a chain
  (a run with more than two stages, or several stages planned by one recipe entry).

The report itself goes to stdout: a markdown table per run (stage, model, params,
MACs, best and last validation accuracy, test accuracy, the published reference
where the recipe has one, and the difference), or, with ``--format json``, the
same as JSON with accuracies in percent (keys ending in ``_pct``).

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import re
import tomllib

from .errors import RunDirectoryError, UserError
from .modelinfo import count_macs
from .rundir import SUMMARY_FILE, atomic_write_bytes, load_checkpoint

PLOTS_DIR = "plots"
CHAIN_PLOT = "accuracy_vs_params.png"


# --- reading a run ------------------------------------------------------------


def load_summary(run_dir: str) -> dict:
    if not os.path.isdir(run_dir):
        raise RunDirectoryError("no such run directory", file=run_dir, fix="pass the folder a run wrote (runs/<name>-<time> or its --output)")
    path = os.path.join(run_dir, SUMMARY_FILE)
    if not os.path.exists(path):
        per_seed = sorted(glob.glob(os.path.join(run_dir, "seed-*", SUMMARY_FILE)))
        if per_seed:  # a `pyramidkd run --seeds` folder: one run per seed inside
            raise RunDirectoryError(
                f"holds one run per seed, no {SUMMARY_FILE} of its own",
                file=run_dir,
                fix=f"report the seeds' runs: pyramidkd report {os.path.join(run_dir, 'seed-*')}",
            )
        raise RunDirectoryError(
            f"holds no {SUMMARY_FILE}: not a finished pyramidkd run",
            file=run_dir,
            fix="pass the folder of a finished run; finish an interrupted one with `pyramidkd run RECIPE --output DIR --resume`",
        )
    try:
        with open(path, encoding="utf-8") as handle:
            summary = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise RunDirectoryError(f"cannot read {SUMMARY_FILE}: {error}", file=path, fix="re-run the recipe into this folder to rewrite it") from error
    if not isinstance(summary, dict) or not isinstance(summary.get("stages"), list):
        raise RunDirectoryError(f"{SUMMARY_FILE} has no list of stages", file=path, fix="re-run the recipe into this folder to rewrite it")
    return summary


def load_epoch_records(run_dir: str) -> dict[str, list[dict]] | None:
    """Epoch records by stage id, in epoch order (None when there is no metrics.jsonl)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    by_stage: dict[str, dict[int, dict]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(record, dict) and record.get("kind") == "epoch" and "stage" in record and "epoch" in record:
                by_stage.setdefault(record["stage"], {})[record["epoch"]] = record  # the last record of an epoch wins
    return {stage: [epochs[e] for e in sorted(epochs)] for stage, epochs in by_stage.items()}


def is_chain(stages: list[dict]) -> bool:
    """More than two stages, or several stages planned by one recipe entry."""
    entries = [stage.get("entry") or stage["stage"] for stage in stages]
    return len(stages) > 2 or len(set(entries)) < len(entries)


class _Hosts:
    """Plugin hosts to rebuild models with, built on first use: one with the
    recipe's local plugin modules where it has any, else the plain one."""

    def __init__(self):
        self._cache: dict[tuple | None, object] = {}

    def for_run(self, run_dir: str, summary: dict):
        from .host import make_plugin_host

        modules: tuple[str, ...] = ()
        try:
            with open(os.path.join(run_dir, "recipe.toml"), "rb") as handle:
                modules = tuple((tomllib.load(handle).get("experiment") or {}).get("plugins") or ())
        except (OSError, tomllib.TOMLDecodeError, AttributeError):
            pass
        search = os.path.dirname(summary.get("recipe") or "") or None
        key = (modules, search) if modules else None
        if key not in self._cache:
            host = None
            if modules:
                try:
                    host = make_plugin_host(modules, local_search_path=search)
                except UserError:  # the modules moved or broke: built-in and installed models still work
                    host = None
            if host is None:
                if None not in self._cache:
                    self._cache[None] = make_plugin_host()
                host = self._cache[None]
            self._cache[key] = host
        return self._cache[key]


def stage_macs(run_dir: str, stage: dict, host) -> tuple[int | None, str | None]:
    """MACs of the stage's best model for one input (rebuilt from its checkpoint),
    or None and the reason."""
    from .stage import model_from_checkpoint

    relative = stage.get("checkpoint")
    if not relative:
        return None, f"stage {stage['stage']!r}: no checkpoint recorded"
    path = os.path.join(run_dir, relative)
    try:
        checkpoint = load_checkpoint(path)
        model, description = model_from_checkpoint(checkpoint, path, host)
        return count_macs(model, tuple(description["input_shape"])), None
    except UserError as error:
        return None, f"stage {stage['stage']!r}: no MACs ({error.message})"
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        return None, f"stage {stage['stage']!r}: no MACs ({type(error).__name__}: {error})"


def _pct(value) -> float | None:
    return None if value is None else 100.0 * value


def build_report(run_dir: str, *, hosts: _Hosts | None = None, plots: bool = True) -> dict:
    """The report of one run (a dict, as ``--format json`` prints it); writes the plots."""
    run_dir = os.path.abspath(run_dir)
    summary = load_summary(run_dir)
    hosts = hosts or _Hosts()
    records = load_epoch_records(run_dir)
    notes: list[str] = []
    if records is None:
        notes.append("no metrics.jsonl (the files logger was off): no training curves")
    stages = []
    host = None
    for result in summary["stages"]:
        if host is None:
            host = hosts.for_run(run_dir, summary)
        macs, problem = stage_macs(run_dir, result, host)
        if problem:
            notes.append(problem)
        test = _pct(result.get("test_acc"))
        reference = result.get("reference_test_acc")
        stages.append(
            {
                "stage": result["stage"],
                "entry": result.get("entry") or result["stage"],
                "model": result.get("model"),
                "loss": result.get("loss"),
                "params": result.get("params"),
                "macs": macs,
                "best_epoch": result.get("best_epoch"),
                "best_val_acc_pct": _pct(result.get("best_val_acc")),
                "last_val_acc_pct": _pct(result.get("last_val_acc")),
                "test_acc_pct": test,
                "reference_test_acc_pct": reference,
                "difference_pct": None if reference is None or test is None else test - reference,
                "curves": None,
            }
        )
    chain = is_chain(summary["stages"])
    report = {
        "run_dir": run_dir,
        "experiment": summary.get("experiment"),
        "dataset": summary.get("dataset"),
        "seed": summary.get("seed"),
        "device": summary.get("device"),
        "chain": chain,
        "stages": stages,
        "accuracy_vs_params": None,
        "notes": notes,
    }
    if plots:
        plot_dir = os.path.join(run_dir, PLOTS_DIR)
        for stage in stages:
            history = (records or {}).get(stage["stage"])
            if history:
                path = os.path.join(plot_dir, f"{_file_name(stage['stage'])}.png")
                _save(plot_curves(stage, history), path)
                stage["curves"] = path
            elif records is not None:
                notes.append(f"stage {stage['stage']!r}: no epoch records in metrics.jsonl: no training curves")
        if chain:
            path = os.path.join(plot_dir, CHAIN_PLOT)
            _save(plot_accuracy_vs_params(report), path)
            report["accuracy_vs_params"] = path
    return report


def _file_name(stage_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stage_id).strip(".") or "stage"


# --- plots ----------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def plot_curves(stage: dict, history: list[dict]):
    """Train/val accuracy (%) and loss against epoch for one stage."""
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    figure = _figure(9, 3.6)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.83, wspace=0.22)
    accuracy, loss = figure.subplots(1, 2)
    marker = "o" if len(epochs) <= 30 else None

    def series(axes, key, label, scale=1.0):
        values = [r.get(key) for r in history]
        points = [(e, scale * v) for e, v in zip(epochs, values) if isinstance(v, (int, float)) and math.isfinite(v)]
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], marker=marker, markersize=3, label=label)

    series(accuracy, "train_acc", "train", 100.0)
    series(accuracy, "val_acc", "val", 100.0)
    if stage.get("test_acc_pct") is not None and stage.get("best_epoch"):
        accuracy.plot([stage["best_epoch"]], [stage["test_acc_pct"]], marker="*", markersize=10, linestyle="none",
                      label=f"test (best epoch {stage['best_epoch']})")
    accuracy.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    series(loss, "train_loss", f"train ({stage.get('loss') or 'stage loss'})")
    series(loss, "val_loss", "val (cross-entropy)")
    loss.set(xlabel="epoch", ylabel="loss", title="loss")
    for axes in (accuracy, loss):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
        if len(epochs) <= 12:
            axes.set_xticks(epochs)
            if len(epochs) == 1:
                axes.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"{stage['stage']}: {stage.get('model')}, {_count(stage.get('params'))} params")
    return figure


def plot_accuracy_vs_params(report: dict):
    """Test accuracy (%) against parameters (log scale); stages of one recipe entry
    are joined in order, published references are hollow markers."""
    figure = _figure(7, 4.8)
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.11, top=0.92)
    axes = figure.subplots()
    by_entry: dict[str, list[dict]] = {}
    for stage in report["stages"]:
        if stage.get("params") and stage.get("test_acc_pct") is not None:
            by_entry.setdefault(stage["entry"], []).append(stage)
    for entry, stages in by_entry.items():
        xs = [s["params"] for s in stages]
        ys = [s["test_acc_pct"] for s in stages]
        (line,) = axes.plot(xs, ys, marker="o", label=entry)
        for stage in stages:
            axes.annotate(stage["stage"], (stage["params"], stage["test_acc_pct"]), textcoords="offset points",
                          xytext=(4, 4), fontsize="x-small")
            if stage.get("reference_test_acc_pct") is not None:
                axes.plot([stage["params"]], [stage["reference_test_acc_pct"]], marker="o", markerfacecolor="none",
                          color=line.get_color(), linestyle="none")
    if any(s.get("reference_test_acc_pct") is not None for s in report["stages"]):
        axes.plot([], [], marker="o", markerfacecolor="none", color="gray", linestyle="none", label="published")
    axes.set_xscale("log")
    axes.margins(x=0.15, y=0.1)  # room for the labels
    axes.set(xlabel="parameters", ylabel="test accuracy (%)", title=f"{report.get('experiment')}: accuracy vs parameters")
    axes.grid(True, which="both", alpha=0.3)
    if by_entry:
        axes.legend(fontsize="small")
    return figure


# --- output ---------------------------------------------------------------------


def _count(value) -> str:
    if value is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.2f}{suffix}"
    return str(value)


def _fmt(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def format_markdown(reports: list[dict]) -> str:
    blocks = []
    for report in reports:
        data = report.get("dataset") or {}
        lines = [
            f"## {report.get('experiment')}",
            "",
            f"`{report['run_dir']}`: {data.get('name')} (train {data.get('train')}, val {data.get('val')}, test {data.get('test')}), "
            f"seed {report.get('seed')}, {report.get('device')}",
            "",
            "| stage | model | params | MACs | best val % | last val % | test % | published % | Δ test − published |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in report["stages"]:
            lines.append(
                "| " + " | ".join(
                    _cell(c) for c in (
                        s["stage"], s.get("model"), _count(s.get("params")), _count(s.get("macs")),
                        _fmt(s["best_val_acc_pct"]), _fmt(s["last_val_acc_pct"]), _fmt(s["test_acc_pct"]),
                        _fmt(s["reference_test_acc_pct"]), _fmt(s["difference_pct"], signed=True),
                    )
                ) + " |"
            )
        lines.append("")
        lines.append("best val % chooses the checkpoint; test % is that checkpoint on the test split; "
                     "MACs: one image, conv + linear layers.")
        curves = [s for s in report["stages"] if s.get("curves")]
        if curves or report.get("accuracy_vs_params"):
            lines.append("")
        if curves:
            links = ", ".join(f"[{s['stage']}]({_relative(s['curves'], report['run_dir'])})" for s in curves)
            lines.append(f"Training curves (in the run directory): {links}")
        if report.get("accuracy_vs_params"):
            if curves:
                lines.append("")
            lines.append(f"Accuracy vs parameters: [{CHAIN_PLOT}]({_relative(report['accuracy_vs_params'], report['run_dir'])})")
        for note in report.get("notes") or []:
            lines.append("")
            lines.append(f"note: {note}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _relative(path: str, run_dir: str) -> str:
    return os.path.relpath(path, run_dir)


def report_command(args) -> int:
    hosts = _Hosts()
    reports = [build_report(run_dir, hosts=hosts) for run_dir in args.runs]
    if args.format == "json":
        print(json.dumps({"runs": reports}, indent=2))
    else:
        print(format_markdown(reports), end="")
    return 0
