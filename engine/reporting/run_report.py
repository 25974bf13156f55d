"""The report of one run: per stage its model, parameters, MACs, best and last
validation accuracy, test accuracy and the published reference; plots of each
stage's training curves and, for a chain, accuracy against parameters."""

from __future__ import annotations

import os

from ..formatting import format_count, format_number, percent
from ..records import BEST_TEST_LABEL, StageResult, load_summary
from .markdown import markdown_block
from .readers import CHAIN_PLOT, METRICS_FILE, PLOTS_DIR, Hosts, is_chain, load_epoch_records, plot_file, stage_macs

RUN_NOTE = "best val % chooses the checkpoint; test % is that checkpoint on the test split; MACs: one image, conv + linear layers."
BEST_TEST_COLUMN = "best test epoch % (literature's protocol)"
BEST_TEST_NOTE = (f"{BEST_TEST_COLUMN}: the highest test accuracy over the stage's epochs ({BEST_TEST_LABEL}, as the papers "
                  "report it; [train] test_every_epoch = true): optimistic, compare it with published figures, not with test %.")
HINT_LABEL = "hint stage: head untrained"
HINT_NOTE = (f"({HINT_LABEL}): a stage that trains the layers up to a hint layer only; its classifier head is not trained, "
             "so its accuracy is near chance by design (the stage after it trains the whole model).")


def is_hint_stage(result: StageResult) -> bool:
    """A hint stage of a FitNet / Pyramid scheme (``<entry>.<level>.hint``, info step "hint")."""
    return result.info.get("step") == "hint" or "hint" in result.stage.split(".")[1:]


def build_run_report(run_dir: str, *, hosts: Hosts, plots: bool = True) -> dict:
    """The report of one run folder (a dict, as ``--format json`` prints it); writes the plots."""
    summary = load_summary(run_dir)
    records = load_epoch_records(run_dir)
    notes: list[str] = []
    if records is None:
        notes.append(f"no {METRICS_FILE} (the files logger was off): no training curves")
    host = hosts.for_run(run_dir, summary) if summary.stages else None
    report = {
        "kind": "run",
        "run_dir": run_dir,
        "experiment": summary.experiment,
        "dataset": summary.dataset.to_dict(),
        "seed": summary.seed,
        "device": summary.device,
        "chain": is_chain(summary.stages),
        "stages": [_stage_row(run_dir, result, host, notes) for result in summary.stages],
        "accuracy_vs_params": None,
        "notes": notes,
    }
    if plots:
        _draw(report, records)
    return report


def _stage_row(run_dir: str, result: StageResult, host, notes: list[str]) -> dict:
    macs, problem = stage_macs(run_dir, result, host)
    if problem:
        notes.append(problem)
    test = percent(result.test_acc)
    reference = result.reference_test_acc
    row = {
        "stage": result.stage,
        "entry": result.entry or result.stage,
        "model": result.model,
        "loss": result.loss,
        "num_parameters": result.num_parameters,
        "macs": macs,
        "best_epoch": result.best_epoch,
        "best_val_acc_pct": percent(result.best_val_acc),
        "last_val_acc_pct": percent(result.last_val_acc),
        "test_acc_pct": test,
        "hint": is_hint_stage(result),
        "reference_test_acc_pct": reference,
        "difference_pct": None if reference is None or test is None else test - reference,
        "curves": None,
    }
    if result.best_test_acc is not None:  # only where measured (test_every_epoch)
        row["best_test_acc_pct"] = percent(result.best_test_acc)
    return row


def _draw(report: dict, records: dict | None) -> None:
    """Each stage's training curves and, for a chain, accuracy against parameters."""
    from .plots import plot_accuracy_vs_params, plot_curves, save

    run_dir = report["run_dir"]
    for stage in report["stages"]:
        history = (records or {}).get(stage["stage"])
        if history:
            stage["curves"] = plot_file(run_dir, stage["stage"])
            save(plot_curves(stage, history), stage["curves"])
        elif records is not None:
            report["notes"].append(f"stage {stage['stage']!r}: no epoch records in {METRICS_FILE}: no training curves")
    if report["chain"]:
        path = os.path.join(run_dir, PLOTS_DIR, CHAIN_PLOT)
        save(plot_accuracy_vs_params(report), path)
        report["accuracy_vs_params"] = path


def format_run_markdown(report: dict) -> str:
    rows = [{
        "stage": f"{s['stage']} ({HINT_LABEL})" if s.get("hint") else s["stage"], "model": s.get("model"), "params": format_count(s.get("num_parameters")),
        "MACs": format_count(s.get("macs")),
        "best val %": format_number(s["best_val_acc_pct"]), "last val %": format_number(s["last_val_acc_pct"]),
        "test %": format_number(s["test_acc_pct"]), "published %": format_number(s["reference_test_acc_pct"]),
        "Δ test − published": format_number(s["difference_pct"], signed=True),
    } for s in report["stages"]]
    note = RUN_NOTE + (" " + HINT_NOTE if any(s.get("hint") for s in report["stages"]) else "")
    if any("best_test_acc_pct" in s for s in report["stages"]):  # the literature's protocol, only when measured
        rows = [{**row, BEST_TEST_COLUMN: format_number(s.get("best_test_acc_pct"))} for row, s in zip(rows, report["stages"])]
        note += " " + BEST_TEST_NOTE
    return markdown_block(report, f"## {report.get('experiment')}", f"seed {report.get('seed')}", rows, note)

