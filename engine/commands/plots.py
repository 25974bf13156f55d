"""Every PNG the commands draw: training curves (one run, or one line per seed),
accuracy against parameters, and the ``bench-models`` bars.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch)
and are written atomically.
"""

from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

from ..formatting import format_count
from ..records import EpochRecord
from ..rundir import atomic_write_bytes


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawing = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(drawing)
    return drawing


def save(drawing, path: str, dpi: int = 100) -> None:
    buffer = io.BytesIO()
    drawing.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def _points(history: Sequence[EpochRecord], field: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """(epochs, values) of one record field, finite values only."""
    pairs = [(r.epoch, scale * v) for r in history if isinstance(v := getattr(r, field), (int, float)) and math.isfinite(v)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _epoch_axis(axes, epochs: Sequence[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    epochs = sorted(set(epochs))
    if len(epochs) <= 12:
        axes.set_xticks(epochs)
        if len(epochs) == 1:
            axes.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _two_panels():
    drawing = figure(9, 3.6)
    drawing.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.83, wspace=0.22)
    accuracy, loss = drawing.subplots(1, 2)
    return drawing, accuracy, loss


def plot_curves(stage: Mapping, history: Sequence[EpochRecord]):
    """Train/val accuracy (%) and loss against epoch for one stage of one run.
    ``stage`` is a report row (``stage``, ``model``, ``params``, ``loss``,
    ``best_epoch``, ``test_acc_pct``)."""
    drawing, accuracy, loss = _two_panels()
    epochs = [r.epoch for r in history]
    marker = "o" if len(epochs) <= 30 else None

    def series(axes, field, label, scale=1.0):
        xs, ys = _points(history, field, scale)
        if xs:
            axes.plot(xs, ys, marker=marker, markersize=3, label=label)

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
        _epoch_axis(axes, epochs)
    drawing.suptitle(f"{stage['stage']}: {stage.get('model')}, {format_count(stage.get('params'))} params")
    return drawing


def plot_seed_curves(stage: Mapping, histories: Mapping[int, Sequence[EpochRecord]]):
    """One stage over several seeds, one colour per seed: validation accuracy
    (solid) and train accuracy (dotted) on the left, the train loss on the right."""
    drawing, accuracy, loss = _two_panels()
    epochs: list[int] = []
    for seed, history in histories.items():
        epochs += [r.epoch for r in history]
        marker = "o" if len(history) <= 30 else None
        xs, ys = _points(history, "val_acc", 100.0)
        (line,) = accuracy.plot(xs, ys, marker=marker, markersize=3, label=f"seed {seed} val")
        xs, ys = _points(history, "train_acc", 100.0)
        accuracy.plot(xs, ys, linestyle=":", color=line.get_color(), label=f"seed {seed} train")
        xs, ys = _points(history, "train_loss")
        loss.plot(xs, ys, marker=marker, markersize=3, color=line.get_color(), label=f"seed {seed}")
    accuracy.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy (val solid, train dotted)")
    loss.set(xlabel="epoch", ylabel="loss", title=f"train loss ({stage.get('loss') or 'stage loss'})")
    for axes in (accuracy, loss):
        _epoch_axis(axes, epochs)
    drawing.suptitle(f"{stage['stage']}: {stage.get('model')}, {format_count(stage.get('params'))} params, "
                     f"{len(histories)} seeds")
    return drawing


def plot_accuracy_vs_params(report: Mapping):
    """Test accuracy (%) against parameters (log scale); stages of one recipe entry
    are joined in order, published references are hollow markers."""
    drawing = figure(7, 4.8)
    drawing.subplots_adjust(left=0.1, right=0.97, bottom=0.11, top=0.92)
    axes = drawing.subplots()
    by_entry: dict[str, list[Mapping]] = {}
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
    return drawing


def plot_bench(rows: Sequence[Mapping], batch_sizes: Sequence[int], title: str):
    """``bench-models``: parameters, then the latency at each batch size, per model."""
    names = [r["name"] for r in rows]
    drawing = figure(4.5 * (1 + len(batch_sizes)), 4)
    axes = drawing.subplots(1, 1 + len(batch_sizes))
    axes[0].bar(names, [r["params"] / 1e6 for r in rows], color="tab:blue")
    axes[0].set_ylabel("parameters (M)")
    for axis, batch_size in zip(axes[1:], batch_sizes):
        axis.bar(names, [1e3 * r["latency_s"][str(batch_size)] for r in rows], color="tab:orange")
        axis.set_ylabel(f"latency, batch {batch_size} (ms)")
    for axis in axes:
        axis.tick_params(axis="x", rotation=60)
    drawing.suptitle(title)
    drawing.tight_layout()
    return drawing
