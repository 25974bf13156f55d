"""``bench-deploy``'s output: the table (stdout and ``bench-deploy.md``), the JSON
(``bench-deploy.json``) and the accuracy-vs-latency plot (``bench-deploy.png``, a
PDF beside it) with its Pareto front: the files no other file beats on both
accuracy and latency."""

from __future__ import annotations

import json
import os
import platform

import torch

from ..formatting import format_markdown_table, format_table
from ..rundir import atomic_write_text

JSON_FILE, TABLE_FILE, PLOT_FILE = "bench-deploy.json", "bench-deploy.md", "bench-deploy.png"
NUMBERS = {"batch", "threads", "median ms", "p90 ms", "images/s", "runs", "accuracy %", "params", "MB"}


def machine() -> dict:
    """What the numbers were measured on."""
    import onnxruntime

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": platform.processor() or platform.machine(), "cores": cores, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows as they are printed."""
    return [{"stage": r["stage"], "artefact": r["artefact"], "runtime": r["runtime"], "precision": r["precision"],
             "batch": r["batch"], "threads": "-" if r["threads"] is None else r["threads"],
             "median ms": f"{r['median_ms']:.3f}", "p90 ms": f"{r['p90_ms']:.3f}", "images/s": f"{r['images_per_s']:.0f}",
             "runs": r["runs"], "accuracy %": "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}",
             "params": "-" if r["parameters"] is None else r["parameters"],
             "MB": "-" if r["file_bytes"] is None else f"{r['file_bytes'] / 1e6:.3f}"} for r in rows]


def format_results(result: dict) -> str:
    """The table, then one line per skipped measurement."""
    lines = [format_table(table_rows(result["rows"]), right=NUMBERS)]
    lines += [f"skipped: {entry['what']}: {entry['reason']}" for entry in result["skipped"]]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    where = result["machine"]
    settings = result["settings"]
    lines = ["# bench-deploy", "",
             f"Measured on {where['cpu']}, {where['cores']} cores (load average {where['load_average']}), GPU {where['gpu']}; "
             f"torch {where['torch']}, onnxruntime {where['onnxruntime']}. Median and p90 of one call, warm-up excluded, "
             f"{settings['budget_s']:g} s per measurement.", "",
             format_markdown_table(table_rows(result["rows"]), right=NUMBERS), ""]
    lines += [f"- skipped: {entry['what']}: {entry['reason']}" for entry in result["skipped"]]
    lines += ["", f"![accuracy vs latency]({PLOT_FILE})", ""]
    return "\n".join(lines)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (latency, accuracy) no other point beats on both, by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for index in order:
        if points[index][1] > best:
            front.append(index)
            best = points[index][1]
    return front


def plot_rows(result: dict) -> tuple[list[dict], int, int | None]:
    """The rows the plot shows: the first batch size and the first thread count (GPU rows too)."""
    batch = result["settings"]["batch_sizes"][0]
    threads = result["settings"]["threads"][0]
    chosen = [r for r in result["rows"] if r["batch"] == batch and r["threads"] in (threads, None) and r["accuracy"] is not None]
    return chosen, batch, threads


def plot_pareto(result: dict):
    from ..reporting.plots import figure, matplotlib_colors, place_labels

    rows, batch, threads = plot_rows(result)
    drawing = figure(7.5, 5)
    axes = drawing.subplots()
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    colors = dict(zip(runtimes, matplotlib_colors(len(runtimes))))
    for runtime in runtimes:
        mine = [r for r in rows if r["runtime"] == runtime]
        axes.scatter([r["median_ms"] for r in mine], [100 * r["accuracy"] for r in mine], color=colors[runtime], label=runtime,
                     marker="o", zorder=3)
    points = [(r["median_ms"], 100 * r["accuracy"]) for r in rows]
    front = pareto(points)
    if len(front) > 1:
        axes.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="grey", linestyle="--",
                  linewidth=1, label="Pareto front", zorder=2)
    from matplotlib.ticker import FuncFormatter, LogLocator

    axes.set_xscale("log")
    plain = FuncFormatter(lambda value, _position: f"{value:g}")  # 0.02, not 2×10^-2 (those overlap)
    axes.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    axes.xaxis.set_major_formatter(plain)
    axes.xaxis.set_minor_formatter(plain)
    axes.set_xlabel(f"median latency, batch {batch}, {threads} thread{'s' if threads != 1 else ''} (ms, log)")
    axes.set_ylabel("test accuracy (%)")
    place_labels(axes, [(f"{r['stage']} {r['precision']}", r["median_ms"], 100 * r["accuracy"]) for r in rows])
    axes.legend(loc="lower right")
    axes.grid(True, alpha=0.3)
    axes.set_title("accuracy vs latency (upper left is better)")
    drawing.tight_layout()
    return drawing


def write_results(result: dict, folder: str) -> dict:
    """``bench-deploy.json``, ``.md`` and ``.png`` (+ ``.pdf``) in ``folder``; their paths."""
    from ..reporting.plots import save

    os.makedirs(folder, exist_ok=True)
    files = {"json": os.path.join(folder, JSON_FILE), "table": os.path.join(folder, TABLE_FILE), "plot": None}
    if plot_rows(result)[0]:
        files["plot"] = os.path.join(folder, PLOT_FILE)
        save(plot_pareto(result), files["plot"], dpi=110)
    atomic_write_text(files["table"], markdown(result))
    atomic_write_text(files["json"], json.dumps({**result, "files": files}, indent=2))
    return files
