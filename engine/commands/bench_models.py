"""``pyramidkd bench-models``: parameters, MACs and measured inference latency of
VGG19 and every SVGG model on this machine, as a table; with ``--output DIR`` also
``DIR/bench-models.json`` and a PNG plot (:mod:`pyramidkd.engine.reporting.bench`)."""

from __future__ import annotations

import argparse
import json

from ..reporting.bench import bench_title, format_rows, parse_batch_sizes, run_bench

NAME = "bench-models"
HELP = "params, MACs and measured latency of vgg19 and the SVGG models (table; JSON + PNG with --output)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="", help="comma-separated model names (default: vgg19 and every SVGG)")
    parser.add_argument("--num-classes", type=int, default=10, metavar="C")
    parser.add_argument("--image-size", type=int, default=96, metavar="S")
    parser.add_argument("--width", type=float, default=1.0, metavar="W")
    parser.add_argument("--batch-sizes", default="1,128", metavar="B1,B2")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--output", "-o", metavar="DIR", help="write bench-models.json and bench-models.png into DIR")
    parser.add_argument("--json", action="store_true")


def execute(args: argparse.Namespace) -> int:
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    result = run_bench(models=[n for n in args.models.split(",") if n], num_classes=args.num_classes,
                       image_size=args.image_size, width=args.width, batch_sizes=batch_sizes, warmup=args.warmup,
                       repeats=args.repeats, device=args.device, output=args.output)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"inference latency (median of {args.repeats} after {args.warmup} warm-up passes), {bench_title(result)}")
    print(format_rows(result["models"], batch_sizes))
    if found := result["vgg19_vs_svgg5"]:
        speed = ", ".join(f"{value:.1f}× faster at batch {bs}" for bs, value in found["speedup"].items())
        print(f"vgg19 → svgg5: {found['params']:.1f}× fewer parameters, {found['macs']:.1f}× fewer MACs, {speed}")
    print(f"plot: {result['plot']}" if result["plot"] else "(add --output DIR to write bench-models.json and a plot)")
    return 0
