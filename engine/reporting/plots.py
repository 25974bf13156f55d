"""Every figure the reports draw: training curves (one run, or one line per seed),
accuracy against parameters, a sweep's accuracy per cell and against training
cost, and the ``bench-models`` bars.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch)
and are written atomically, each as a PNG and, beside it, a vector PDF for papers,
with font sizes that stay legible at a column's width.
"""

from __future__ import annotations

import io
import math
import os
from typing import Mapping, Sequence

from ..formatting import format_count, percent
from ..records import EpochRecord
from ..rundir import atomic_write_bytes

SEED_OFFSET, SEED_SPREAD = 0.22, 0.05  # a sweep plot's seed dots right of the mean (in cells), apart from each other
FONT_SIZES = {"suptitle": 13, "title": 12, "label": 11, "ticks": 10, "legend": 9}  # points
LABEL_SIZE = 9  # a point's label (points)


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawing = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(drawing)
    return drawing


def save(drawing, path: str, dpi: int = 100) -> None:
    """``path`` (a PNG) and the same figure as a vector PDF beside it (``.pdf``)."""
    _paper_fonts(drawing)
    for file, kind in ((path, "png"), (os.path.splitext(path)[0] + ".pdf", "pdf")):
        buffer = io.BytesIO()
        # No creation date in the PDF: the same figure gives the same bytes.
        drawing.savefig(buffer, format=kind, dpi=dpi, **({"metadata": {"CreationDate": None}} if kind == "pdf" else {}))
        atomic_write_bytes(file, buffer.getvalue())


def _paper_fonts(drawing) -> None:
    """Titles, axis labels, ticks and legends at :data:`FONT_SIZES`."""
    for text in drawing.texts:  # the suptitle
        text.set_fontsize(FONT_SIZES["suptitle"])
    for axes in drawing.axes:
        axes.title.set_fontsize(FONT_SIZES["title"])
        axes.xaxis.label.set_fontsize(FONT_SIZES["label"])
        axes.yaxis.label.set_fontsize(FONT_SIZES["label"])
        axes.tick_params(labelsize=FONT_SIZES["ticks"])
        legend = axes.get_legend()
        if legend is not None:
            for text in legend.get_texts():
                text.set_fontsize(FONT_SIZES["legend"])


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
    ``stage`` is a report row (``stage``, ``model``, ``num_parameters``, ``loss``,
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
    drawing.suptitle(f"{stage['stage']}: {stage.get('model')}, {format_count(stage.get('num_parameters'))} params")
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
    drawing.suptitle(f"{stage['stage']}: {stage.get('model')}, {format_count(stage.get('num_parameters'))} params, "
                     f"{len(histories)} seeds")
    return drawing


def plot_accuracy_vs_params(report: Mapping):
    """Test accuracy (%) against parameters (log scale) of the final stages (a hint
    stage's untrained head would draw a zig-zag); stages of one recipe entry are
    joined in order, published references are hollow markers, labels do not overlap."""
    drawing = figure(7, 4.8)
    drawing.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.91)
    axes = drawing.subplots()
    by_entry: dict[str, list[Mapping]] = {}
    for stage in report["stages"]:
        if stage.get("num_parameters") and stage.get("test_acc_pct") is not None and not stage.get("hint"):
            by_entry.setdefault(stage["entry"], []).append(stage)
    for entry, stages in by_entry.items():
        xs = [s["num_parameters"] for s in stages]
        ys = [s["test_acc_pct"] for s in stages]
        (line,) = axes.plot(xs, ys, marker="o", label=entry)
        for stage in stages:
            if stage.get("reference_test_acc_pct") is not None:
                axes.plot([stage["num_parameters"]], [stage["reference_test_acc_pct"]], marker="o", markerfacecolor="none",
                          color=line.get_color(), linestyle="none")
    if any(s.get("reference_test_acc_pct") is not None for s in report["stages"]):
        axes.plot([], [], marker="o", markerfacecolor="none", color="gray", linestyle="none", label="published")
    axes.set_xscale("log")
    axes.margins(x=0.15, y=0.12)  # room for the labels
    axes.set(xlabel="parameters", ylabel="test accuracy (%)", title=f"{report.get('experiment')}: accuracy vs parameters")
    axes.grid(True, which="both", alpha=0.3)
    if by_entry:
        axes.legend(fontsize="small")
    points = [(s["stage"], s["num_parameters"], s["test_acc_pct"]) for stages in by_entry.values() for s in stages]
    place_labels(axes, points)
    return drawing


# Where a label may go, in points from its marker, tried in order (right, above, below, left).
LABEL_OFFSETS = ((6, 4), (6, -12), (-6, 8), (-6, -14), (6, 16), (6, -24), (-6, 20), (-6, -26), (6, 28), (6, -36))


def place_labels(axes, points: Sequence[tuple[str, float, float]]) -> list[tuple[float, float]]:
    """Annotate each (text, x, y) at the first offset (:data:`LABEL_OFFSETS`) whose box
    overlaps no label placed before it nor any marker (a greedy placement);
    returns the offsets chosen, in points."""
    axes.autoscale_view()
    scale = axes.figure.dpi / 72.0  # pixels per point
    markers = [axes.transData.transform((x, y)) for _, x, y in points]
    marker_boxes = [(mx - 3 * scale, my - 3 * scale, mx + 3 * scale, my + 3 * scale) for mx, my in markers]
    boxes: list[tuple[float, float, float, float]] = []
    chosen = []
    for (text, x, y), (px, py) in zip(points, markers):
        size = (0.6 * LABEL_SIZE * len(text) * scale, 1.2 * LABEL_SIZE * scale)
        free = [(dx, dy) for dx, dy in LABEL_OFFSETS
                if not any(_overlap(_label_box(px, py, dx, dy, size, scale), other) for other in boxes + marker_boxes)]
        dx, dy = free[0] if free else LABEL_OFFSETS[0]
        box = _label_box(px, py, dx, dy, size, scale)
        boxes.append(box)
        chosen.append((dx, dy))
        axes.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=LABEL_SIZE,
                      ha="right" if dx < 0 else "left")
    return chosen


def _label_box(px: float, py: float, dx: float, dy: float, size: tuple[float, float], scale: float):
    """The pixel box of a label ``size`` (width, height) at (dx, dy) points from (px, py)."""
    left = px + dx * scale - (size[0] if dx < 0 else 0.0)
    bottom = py + dy * scale
    return (left, bottom, left + size[0], bottom + size[1])


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


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


def plot_accuracy_vs_cost(results: dict):
    """Each method's final test accuracy (%) against its total training MACs (log
    scale), mean with std error bars on both axes: what each method's accuracy cost."""
    drawing = figure(9.0, 5.6)
    axes = drawing.subplots()
    colors = matplotlib_colors(sum(len(cell.get("methods") or {}) for cell in results["cells"]))
    several_cells = len(results["cells"]) > 1
    placed: list[tuple[float, float]] = []
    for cell in results["cells"]:
        for entry, method in (cell.get("methods") or {}).items():
            final = cell["stages"].get(method["final_stage"])
            cost = method["train_macs"]
            if not final or final["test_acc"]["mean"] is None or cost["mean"] is None:
                continue
            label = f"{cell['id']}: {entry}" if several_cells else entry
            x, y = cost["mean"], percent(final["test_acc"]["mean"])
            axes.errorbar([x], [y], xerr=[cost["std"] or 0.0], yerr=[percent(final["test_acc"]["std"]) or 0.0], fmt="o",
                          capsize=4, color=next(colors))
            # Labels instead of a legend; a label near an earlier one moves down a line.
            near = sum(abs(math.log10(x) - px) < 0.08 and abs(y - py) < 2.0 for px, py in placed)
            placed.append((math.log10(x), y))
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(7, 3 - 11 * near), fontsize="small")
    axes.set_xscale("log")
    axes.set(xlabel="training cost of the method's own stages (MACs, log scale)", ylabel="final test accuracy (%)",
             title=f"{results.get('name')}: accuracy vs training cost (mean ± std over seeds)")
    axes.grid(True, alpha=0.3)
    drawing.tight_layout()
    return drawing


def _baseline_mean(results: dict, stage_id: str) -> tuple[str, float] | None:
    """The first baseline naming a cell whose ``stage_id`` has a mean: (label, mean %)."""
    by_id = {cell["id"]: cell for cell in results["cells"]}
    for baseline in results["baselines"]:
        cell = by_id.get(baseline.get("cell"))
        stage = cell["stages"].get(baseline.get("stage") or stage_id) if cell else None
        if stage and stage["test_acc"]["mean"] is not None:
            return baseline["label"], percent(stage["test_acc"]["mean"])
    return None


def plot_sweep_stage(results: dict, stage_id: str):
    """One stage's test accuracy (%) per cell: the mean with a std error bar, each
    seed a dot beside it, the first baseline cell's mean a dashed line."""
    entries = [(cell["id"] or "-", cell["stages"][stage_id]["test_acc"])
               for cell in results["cells"] if stage_id in cell["stages"]]
    drawing = figure(max(5.0, 2.0 + 0.9 * len(entries)), 4.4)
    axes = drawing.subplots()
    positions = list(range(len(entries)))
    means = [percent(stats["mean"]) for _, stats in entries]
    spreads = [percent(stats["std"]) or 0.0 for _, stats in entries]
    axes.errorbar(positions, means, yerr=spreads, fmt="o", markersize=7, capsize=5, label="mean ± std", zorder=3)
    for position, (_, stats) in zip(positions, entries):
        values = [percent(v) for v in stats["values"] if v is not None]
        offsets = _spread(len(values))
        axes.plot([position + o for o in offsets], values, marker=".", linestyle="none", color="gray", alpha=0.7,
                  label="seeds" if position == 0 else None)
    baseline = _baseline_mean(results, stage_id)
    if baseline:
        axes.axhline(baseline[1], linestyle="--", color="tab:red", alpha=0.6, label=f"baseline {baseline[0]}")
    axes.set_xticks(positions, [label for label, _ in entries], rotation=30, ha="right", fontsize="small")
    axes.set_xlim(-0.6, len(entries) - 0.4)
    axes.set(ylabel="test accuracy (%)", title=_title(results, stage_id))
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    drawing.tight_layout()  # room for the cell labels, however long
    return drawing


def matplotlib_colors(count: int):
    """``count`` distinct colours (tab10, or tab20 beyond ten), one after another."""
    from matplotlib import colormaps

    if count <= 10:
        palette = colormaps["tab10"].colors
    else:  # tab20's dark shades first
        tab20 = colormaps["tab20"].colors
        palette = tab20[0::2] + tab20[1::2]
    return iter(palette[i % len(palette)] for i in range(max(count, 1)))


def _spread(count: int) -> Sequence[float]:
    """Offsets right of the mean marker, so that the seed dots hide neither it nor each other."""
    return [SEED_OFFSET + SEED_SPREAD * i for i in range(count)]


def _title(results: dict, stage_id: str) -> str:
    first = next(cell["stages"][stage_id] for cell in results["cells"] if stage_id in cell["stages"])
    return f"{results.get('name')}: {stage_id} ({first['model']}, {format_count(first['num_parameters'])} params)"
