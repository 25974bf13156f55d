"""``pyramidkd bench-models``: parameters, MACs and measured inference latency of
VGG19 and every SVGG model on this machine.

It checks the published claim "VGG19 → SVGG5: several times fewer parameters,
about 4× faster" on the user's own hardware and states the measured ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Sequence

import torch

from ..errors import UserError
from ..formatting import format_count, format_table
from ..rundir import atomic_write_text
from ..training.models import count_macs, count_parameters
from .models import default_params

DEFAULT_MODELS = ["vgg19", "svgg17", "svgg14", "svgg11", "svgg8", "svgg5", "svgg17_b", "svgg14_b", "svgg11_b", "svgg8_b"]
JSON_FILE, PLOT_FILE = "bench-models.json", "bench-models.png"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def latency(model: torch.nn.Module, batch: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median seconds of one forward pass, after ``warmup`` passes."""
    for _ in range(warmup):
        model(batch)
    _synchronize(batch.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(batch)
        _synchronize(batch.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_models(registry, names, *, num_classes, image_size, width, batch_sizes, warmup, repeats, device) -> list[dict]:
    rows = []
    shape = (3, image_size, image_size)
    for name in names:
        cls = registry.get(name, key="--models")
        model = cls(default_params(cls, width)).build(num_classes, shape).to(device).eval()
        row = {"name": name, "params": count_parameters(model), "macs": count_macs(model, shape), "latency_s": {}}
        for batch_size in batch_sizes:
            batch = torch.randn((batch_size, *shape), device=device)
            row["latency_s"][str(batch_size)] = latency(model, batch, warmup, repeats)
        rows.append(row)
        del model
    return rows


def ratios(rows: list[dict], baseline: str = "vgg19", target: str = "svgg5") -> dict | None:
    by_name = {row["name"]: row for row in rows}
    if baseline not in by_name or target not in by_name:
        return None
    a, b = by_name[baseline], by_name[target]
    return {
        "baseline": baseline,
        "target": target,
        "params": a["params"] / b["params"],
        "macs": a["macs"] / b["macs"],
        "speedup": {bs: a["latency_s"][bs] / b["latency_s"][bs] for bs in a["latency_s"]},
    }


def format_rows(rows: list[dict], batch_sizes) -> str:
    latency_columns = [f"batch {bs} (ms)" for bs in batch_sizes]
    table = [
        {"model": r["name"], "params": format_count(r["params"]), "MACs": format_count(r["macs"]),
         **{column: f"{1e3 * r['latency_s'][str(bs)]:.2f}" for column, bs in zip(latency_columns, batch_sizes)}}
        for r in rows
    ]
    return format_table(table, right={"params", "MACs", *latency_columns})


def parse_batch_sizes(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b]
    except ValueError:
        raise UserError(f"--batch-sizes {text!r} is not a list of integers", fix="e.g. --batch-sizes 1,128") from None


def run_bench(*, models: Sequence[str] = (), num_classes: int = 10, image_size: int = 96, width: float = 1.0,
              batch_sizes: Sequence[int] = (1, 128), warmup: int = 3, repeats: int = 10, device: str = "auto",
              output: str | None = None) -> dict:
    """Measure the models (default: vgg19 and every SVGG) and return the result; with
    ``output``, also write ``bench-models.json`` and ``bench-models.png`` into it
    (``plot``: the PNG's path, else None)."""
    from ..host import make_plugin_host

    if not batch_sizes or min(batch_sizes) < 1 or repeats < 1 or warmup < 0:
        raise UserError("batch sizes and --repeats must be >= 1, --warmup >= 0", fix="e.g. --batch-sizes 1,128 --repeats 10")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible", fix="use --device cpu or auto")
    chosen = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    rows = bench_models(make_plugin_host().registry("model"), list(models) or DEFAULT_MODELS, num_classes=num_classes,
                        image_size=image_size, width=width, batch_sizes=batch_sizes, warmup=warmup, repeats=repeats,
                        device=chosen)
    device_name = torch.cuda.get_device_name(chosen) if chosen.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    result = {"device": device_name, "image_size": image_size, "num_classes": num_classes, "width": width,
              "torch": torch.__version__, "models": rows, "vgg19_vs_svgg5": ratios(rows), "plot": None}
    if output is not None:
        _write(result, list(batch_sizes), output)
    return result


def bench_title(result: dict) -> str:
    """What was measured: input size, classes, width, device."""
    return (f"{result['image_size']}×{result['image_size']}, {result['num_classes']} classes, width {result['width']:g} "
            f"on {result['device']}")


def _write(result: dict, batch_sizes: list[int], output: str) -> None:
    from .plots import plot_bench, save

    os.makedirs(output, exist_ok=True)
    result["plot"] = os.path.join(output, PLOT_FILE)
    save(plot_bench(result["models"], batch_sizes, bench_title(result)), result["plot"], dpi=110)
    atomic_write_text(os.path.join(output, JSON_FILE), json.dumps(result, indent=2))
