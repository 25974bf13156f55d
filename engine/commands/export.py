"""``pyramidkd export RUN_DIR [--stage ID] [--format onnx|pt2|torchscript] [--quantize int8] [--calibration N]
[--output PATH]``: a stage's best checkpoint as a deployable file, verified on the
stage's test images; ``--quantize int8``: ONNX Runtime static quantisation, judged
by its accuracy (:mod:`pyramidkd.engine.deploy`; docs/deploy.md)."""

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
    parser.add_argument("--quantize", choices=["int8"], help="int8: post-training static quantisation (ONNX Runtime, "
                        "QDQ, per-channel), with --format onnx")
    parser.add_argument("--calibration", type=int, metavar="N", help="training images the int8 ranges are calibrated on, "
                        "drawn with the run's seed (default 256, or all if fewer)")
    parser.add_argument("--output", "-o", metavar="PATH", help="a file or a folder (default: RUN_DIR/export/<stage>.<format>)")


def execute(args: argparse.Namespace) -> int:
    from ..deploy.export import export_stage
    from ..errors import UserError

    if args.quantize is None and args.calibration is not None:
        raise UserError("--calibration only applies with --quantize int8", fix="add --quantize int8, or drop --calibration")
    if args.quantize is not None:
        if args.format != "onnx":
            raise UserError(f"--quantize int8 needs --format onnx (not {args.format})", fix="use --format onnx --quantize int8")
        from ..deploy.quantize import quantize_stage

        done = quantize_stage(args.run_dir, args.stage, args.output, calibration=args.calibration)
    else:
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
    if "int8_vs_fp32" in report:
        from ..deploy.quantize import int8_summary

        print("\n".join(int8_summary(report)))
    print(f"  report and preprocessing: {os.path.relpath(done.report_path)}")
    return 0
