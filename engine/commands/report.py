"""``pyramidkd report RUN_DIR...``: tables and plots of finished runs.

For each run directory it reads ``summary.json`` (one result per stage) and
``metrics.jsonl`` (one record per epoch) back as typed records, rebuilds every
stage's best model from its checkpoint to count MACs, and writes into
``RUN_DIR/plots/``:

* ``<stage>.png``: training curves (train/val accuracy and loss vs epoch);
* ``accuracy_vs_params.png``: test accuracy against parameter count, for a chain
  (a run with more than two stages, or several stages planned by one recipe entry).

The report itself goes to stdout: a markdown table per run (stage, model, params,
MACs, best and last validation accuracy, test accuracy, the published reference
where the recipe has one, and the difference), or, with ``--format json``, the
same as JSON with accuracies in percent (keys ending in ``_pct``).

A ``run --seeds`` folder (``DIR/seed-N/...``) is reported as one: mean ± std per
stage and the seeds' training curves overlaid (:mod:`.report_seeds`); a sweep
folder (``sweep.json``) gets the sweep's table and a plot per stage (:mod:`.report_sweep`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tomllib
from typing import Sequence

from ..errors import UnsafeCheckpointError, UserError
from ..formatting import format_count, format_markdown_table, format_number, percent
from ..records import EpochRecord, RunSummary, StageResult, load_summary, read_metrics

NAME = "report"
HELP = "tables and plots of finished runs (writes RUN_DIR/plots/*.png)"
PLOTS_DIR = "plots"
CHAIN_PLOT = "accuracy_vs_params.png"
METRICS_FILE = "metrics.jsonl"


# --- reading a run ------------------------------------------------------------


def load_epoch_records(run_dir: str) -> dict[str, list[EpochRecord]] | None:
    """Epoch records by stage id, in epoch order (None when there is no metrics.jsonl)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    by_stage: dict[str, dict[int, EpochRecord]] = {}
    for record in read_metrics(path):
        if isinstance(record, EpochRecord) and record.stage:
            by_stage.setdefault(record.stage, {})[record.epoch] = record  # the last record of an epoch wins
    return {stage: [epochs[e] for e in sorted(epochs)] for stage, epochs in by_stage.items()}


def is_chain(stages: Sequence[StageResult]) -> bool:
    """More than two stages, or several stages planned by one recipe entry."""
    entries = [stage.entry or stage.stage for stage in stages]
    return len(stages) > 2 or len(set(entries)) < len(entries)


class Hosts:
    """Plugin hosts to rebuild models with, built on first use: one with the
    recipe's local plugin modules where it has any, else the plain one."""

    def __init__(self):
        self._cache: dict[tuple | None, object] = {}

    def for_run(self, run_dir: str, summary: RunSummary):
        from ..host import make_plugin_host

        modules: tuple[str, ...] = ()
        try:
            with open(os.path.join(run_dir, "recipe.toml"), "rb") as handle:
                modules = tuple((tomllib.load(handle).get("experiment") or {}).get("plugins") or ())
        except (OSError, tomllib.TOMLDecodeError, AttributeError):
            pass
        search = os.path.dirname(summary.recipe or "") or None
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


def stage_macs(run_dir: str, stage: StageResult, host) -> tuple[int | None, str | None]:
    """MACs of the stage's best model for one input (rebuilt from its checkpoint),
    or None and the reason."""
    from ..training.checkpoints import load_checkpoint
    from ..training.models import count_macs, model_from_checkpoint

    if not stage.checkpoint:
        return None, f"stage {stage.stage!r}: no checkpoint recorded"
    path = os.path.join(run_dir, stage.checkpoint)
    try:
        model, description = model_from_checkpoint(load_checkpoint(path), path, host)
        return count_macs(model, tuple(description["input_shape"])), None
    except UnsafeCheckpointError:
        raise  # a file that would run code is an error, not a missing number
    except UserError as error:
        return None, f"stage {stage.stage!r}: no MACs ({error.message})"
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        return None, f"stage {stage.stage!r}: no MACs ({type(error).__name__}: {error})"


def plot_file(run_dir: str, name: str) -> str:
    """``RUN_DIR/plots/<name>.png``, the name made safe for a file name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "stage"
    return os.path.join(run_dir, PLOTS_DIR, f"{safe}.png")


def build_report(run_dir: str, *, hosts: Hosts | None = None, plots: bool = True) -> dict:
    """The report of one run (a dict, as ``--format json`` prints it); writes the plots.
    A ``--seeds`` folder gets the report of :func:`.report_seeds.build_seeds_report`."""
    from ..sweeps.results import is_sweep_folder
    from .plots import plot_accuracy_vs_params, plot_curves, save
    from .report_seeds import build_seeds_report, is_seeds_folder
    from .report_sweep import build_sweep_report

    run_dir = os.path.abspath(run_dir)
    hosts = hosts or Hosts()
    if is_sweep_folder(run_dir):
        return build_sweep_report(run_dir, hosts=hosts, plots=plots)
    if is_seeds_folder(run_dir):
        return build_seeds_report(run_dir, hosts=hosts, plots=plots)
    summary = load_summary(run_dir)
    records = load_epoch_records(run_dir)
    notes: list[str] = []
    if records is None:
        notes.append(f"no {METRICS_FILE} (the files logger was off): no training curves")
    host = hosts.for_run(run_dir, summary) if summary.stages else None
    stages = []
    for result in summary.stages:
        macs, problem = stage_macs(run_dir, result, host)
        if problem:
            notes.append(problem)
        test = percent(result.test_acc)
        reference = result.reference_test_acc
        stages.append({
            "stage": result.stage,
            "entry": result.entry or result.stage,
            "model": result.model,
            "loss": result.loss,
            "params": result.params,
            "macs": macs,
            "best_epoch": result.best_epoch,
            "best_val_acc_pct": percent(result.best_val_acc),
            "last_val_acc_pct": percent(result.last_val_acc),
            "test_acc_pct": test,
            "reference_test_acc_pct": reference,
            "difference_pct": None if reference is None or test is None else test - reference,
            "curves": None,
        })
    chain = is_chain(summary.stages)
    report = {
        "kind": "run",
        "run_dir": run_dir,
        "experiment": summary.experiment,
        "dataset": summary.dataset.to_dict(),
        "seed": summary.seed,
        "device": summary.device,
        "chain": chain,
        "stages": stages,
        "accuracy_vs_params": None,
        "notes": notes,
    }
    if plots:
        for stage in stages:
            history = (records or {}).get(stage["stage"])
            if history:
                stage["curves"] = plot_file(run_dir, stage["stage"])
                save(plot_curves(stage, history), stage["curves"])
            elif records is not None:
                notes.append(f"stage {stage['stage']!r}: no epoch records in {METRICS_FILE}: no training curves")
        if chain:
            path = os.path.join(run_dir, PLOTS_DIR, CHAIN_PLOT)
            save(plot_accuracy_vs_params(report), path)
            report["accuracy_vs_params"] = path
    return report


# --- output ---------------------------------------------------------------------

RUN_NOTE = "best val % chooses the checkpoint; test % is that checkpoint on the test split; MACs: one image, conv + linear layers."


def dataset_line(report: dict) -> str:
    data = report.get("dataset") or {}
    return f"{data.get('name')} (train {data.get('train')}, val {data.get('val')}, test {data.get('test')})"


def links(report: dict) -> list[str]:
    """The lines linking the plots (relative to the run folder), then the notes."""
    lines: list[str] = []
    curves = [s for s in report["stages"] if s.get("curves")]
    if curves:
        lines += ["", "Training curves (in the run directory): "
                  + ", ".join(f"[{s['stage']}]({os.path.relpath(s['curves'], report['run_dir'])})" for s in curves)]
    if report.get("accuracy_vs_params"):
        lines += ["", f"Accuracy vs parameters: [{CHAIN_PLOT}]({os.path.relpath(report['accuracy_vs_params'], report['run_dir'])})"]
    for note in report.get("notes") or []:
        lines += ["", f"note: {note}"]
    return lines


def format_run_markdown(report: dict) -> str:
    rows = [{
        "stage": s["stage"], "model": s.get("model"), "params": format_count(s.get("params")), "MACs": format_count(s.get("macs")),
        "best val %": format_number(s["best_val_acc_pct"]), "last val %": format_number(s["last_val_acc_pct"]),
        "test %": format_number(s["test_acc_pct"]), "published %": format_number(s["reference_test_acc_pct"]),
        "Δ test − published": format_number(s["difference_pct"], signed=True),
    } for s in report["stages"]]
    return markdown_block(report, f"## {report.get('experiment')}", f"seed {report.get('seed')}", rows, RUN_NOTE)


def markdown_block(report: dict, title: str, runs: str, rows: list[dict], note: str) -> str:
    """One report in markdown: title, folder and data, the table, the note, plot links and notes."""
    lines = [
        title,
        "",
        f"`{report['run_dir']}`: {dataset_line(report)}, {runs}, {report.get('device')}",
        "",
        format_markdown_table(rows, right=set(rows[0]) - {"stage", "model"}) if rows else "(no stages)",
        "",
        note,
    ]
    return "\n".join(lines + links(report))


def format_markdown(reports: list[dict]) -> str:
    from .report_seeds import format_seeds_markdown
    from .report_sweep import format_sweep_report

    formats = {"seeds": format_seeds_markdown, "sweep": format_sweep_report}
    blocks = [formats.get(r.get("kind"), format_run_markdown)(r) for r in reports]
    return "\n\n".join(blocks) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (or a `run --seeds` or `sweep` folder), e.g. runs/quickstart-20250101-120000")
    parser.add_argument("--format", choices=["markdown", "json"], default="markdown", help="output format (default: markdown)")


def execute(args: argparse.Namespace) -> int:
    hosts = Hosts()
    reports = [build_report(run_dir, hosts=hosts) for run_dir in args.runs]
    if args.format == "json":
        print(json.dumps({"runs": reports}, indent=2))
    else:
        print(format_markdown(reports), end="")
    return 0
