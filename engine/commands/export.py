"""``pyramidkd export RUN_DIR [--stage ID] [--format onnx|pt2|torchscript] [--output PATH]``:
a stage's best checkpoint as a deployable file, verified on the stage's test images
(:mod:`pyramidkd.engine.deploy`; docs/deploy.md)."""

from __future__ import annotations

import argparse
import os

NAME = "export"
HELP = "export a stage's best checkpoint (ONNX, torch.export pt2, TorchScript), verified on its test images"
FORMATS = ("onnx", "pt2", "torchscript")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the folder of a run")
    parser.add_argument("--stage", metavar="ID", help="the stage whose best checkpoint is exported (default: the run's last)")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (default; needs the deploy extra), pt2 or torchscript")
    parser.add_argument("--output", "-o", metavar="PATH", help="a file or a folder (default: RUN_DIR/export/<stage>.<format>)")


def execute(args: argparse.Namespace) -> int:
    from ..deploy.export import export_stage

    done = export_stage(args.run_dir, args.stage, args.format, args.output)
    report, checked = done.report, done.report["verification"]
    for note in done.notes:
        print(f"note: {note}")
    accuracy = report["test_accuracy"]
    print(f"{os.path.relpath(done.path)}: stage {report['stage']!r} as {report['format']} ({report['exporter']}), "
          f"{report['file_bytes'] / 1e6:.2f} MB")
    bound = f" ≤ {checked['tolerance']:g}" if checked["tolerance"] is not None else ""
    print(f"  verified on {checked['images']} test images: logits max abs diff {checked['max_abs_diff']:.2e} "
          f"(relative {checked['relative_diff']:.2e}{bound}); test accuracy "
          f"{100 * accuracy['exported']:.2f} % (checkpoint {100 * accuracy['checkpoint']:.2f} %)")
    print(f"  report and preprocessing: {os.path.relpath(done.report_path)}")
    return 0
