"""``pyramidkd save-weights RUN_DIR --stage ID [--output PATH]``: a stage's best
weights as ``.safetensors``, to share without code (see docs/security.md)."""

from __future__ import annotations

import argparse
import os

NAME = "save-weights"
HELP = "write a stage's best weights as .safetensors, its model and preprocessing as JSON (to share a teacher safely)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the folder of a run")
    parser.add_argument("--stage", required=True, metavar="ID", help="the stage whose best checkpoint is written")
    parser.add_argument("--output", "-o", metavar="PATH",
                        help="a .safetensors file or a folder (default: RUN_DIR/weights/<stage>.safetensors)")


def execute(args: argparse.Namespace) -> int:
    from ..training.sharing import save_stage_weights

    saved = save_stage_weights(args.run_dir, args.stage, args.output)
    model = saved.description["model"]
    print(f"{os.path.relpath(saved.path)}: stage {args.stage!r}, model {model['name']} "
          f"({model['num_classes']} classes, input {'×'.join(str(n) for n in model['input_shape'])}); "
          f"description in its metadata and in {os.path.relpath(saved.description_path)}")
    print(f'  use it as a teacher: teacher = "{saved.path}" (or init_from)')
    return 0
