"""The markdown every report shares: title, folder and data, the table, the note,
links to the plots, then the notes."""

from __future__ import annotations

import os

from ..formatting import format_markdown_table, format_number
from .readers import CHAIN_PLOT


def dataset_line(report: dict) -> str:
    data = report.get("dataset") or {}
    return f"{data.get('name')} (train {data.get('train')}, val {data.get('val')}, test {data.get('test')})"


def mean_std_text(mean: float | None, std: float | None) -> str:
    """``97.12 ± 0.40`` (percent); the mean alone when there is no spread (one seed)."""
    return format_number(mean) if std is None else f"{format_number(mean)} ± {format_number(std)}"


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
