"""``pyramidkd bench-models``: parameters, MACs and measured inference latency of
VGG19 and every SVGG model on this machine, as a table, JSON and a PNG plot.

It checks the published claim "VGG19 → SVGG5: several times fewer parameters,
about 4× faster" on the user's own hardware and states the measured ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from ..errors import UserError
from ..formatting import format_count, format_table
from ..training.models import count_parameters
from ..training.models import count_macs
from .models import default_params

NAME = "bench-models"
HELP = "params, MACs and measured latency of vgg19 and the SVGG models (table + PNG)"
DEFAULT_MODELS = ["vgg19", "svgg17", "svgg14", "svgg11", "svgg8", "svgg5", "svgg17_b", "svgg14_b", "svgg11_b", "svgg8_b"]


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="", help="comma-separated model names (default: vgg19 and every SVGG)")
    parser.add_argument("--num-classes", type=int, default=10, metavar="C")
    parser.add_argument("--image-size", type=int, default=96, metavar="S")
    parser.add_argument("--width", type=float, default=1.0, metavar="W")
    parser.add_argument("--batch-sizes", default="1,128", metavar="B1,B2")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--output", default=".", metavar="DIR", help="where bench-models.png and .json go")
    parser.add_argument("--json", action="store_true")


def execute(args: argparse.Namespace) -> int:
    from ..host import make_plugin_host
    from .plots import plot_bench, save

    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        raise UserError(f"--batch-sizes {args.batch_sizes!r} is not a list of integers", fix="e.g. --batch-sizes 1,128") from None
    if not batch_sizes or min(batch_sizes) < 1 or args.repeats < 1 or args.warmup < 0:
        raise UserError("batch sizes and --repeats must be >= 1, --warmup >= 0", fix="e.g. --batch-sizes 1,128 --repeats 10")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible", fix="use --device cpu or auto")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    names = [n for n in args.models.split(",") if n] if args.models else DEFAULT_MODELS
    registry = make_plugin_host().registry("model")
    rows = bench_models(registry, names, num_classes=args.num_classes, image_size=args.image_size, width=args.width,
                        batch_sizes=batch_sizes, warmup=args.warmup, repeats=args.repeats, device=device)
    found = ratios(rows)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = f"{args.image_size}×{args.image_size}, {args.num_classes} classes, width {args.width:g} on {device_name}"
    os.makedirs(args.output, exist_ok=True)
    png = os.path.join(args.output, "bench-models.png")
    save(plot_bench(rows, batch_sizes, title), png, dpi=110)
    result = {"device": device_name, "image_size": args.image_size, "num_classes": args.num_classes, "width": args.width,
              "torch": torch.__version__, "models": rows, "vgg19_vs_svgg5": found, "plot": png}
    with open(os.path.join(args.output, "bench-models.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"inference latency (median of {args.repeats} after {args.warmup} warm-up passes), {title}")
    print(format_rows(rows, batch_sizes))
    if found:
        speed = ", ".join(f"{value:.1f}× faster at batch {bs}" for bs, value in found["speedup"].items())
        print(f"vgg19 → svgg5: {found['params']:.1f}× fewer parameters, {found['macs']:.1f}× fewer MACs, {speed}")
    print(f"plot: {png}")
    return 0
