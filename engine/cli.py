"""The ``pyramidkd`` command line.

Exit codes: 0 ok, 1 bad input (a short message naming file, key and fix; the
traceback only with ``--debug``), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

from .errors import UserError

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE = 0, 1, 2


def _version() -> str:
    from pyramidkd import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyramidkd",
        description="Knowledge-distillation experiments (Pyramid VGG19 -> SVGG compression) from one TOML recipe.",
    )
    parser.add_argument("--version", action="version", version=f"pyramidkd {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def recipe_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("recipe", metavar="RECIPE", help="a .toml recipe, e.g. recipes/quickstart.toml")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a recipe value, e.g. --set train.epochs=3 (repeatable)")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return sub

    run = recipe_command("run", "run a recipe")
    run.add_argument("--output", "-o", metavar="DIR", help="run directory (default: runs/<experiment>-<time>)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bars or epoch lines (CI)")
    run.add_argument("--seeds", metavar="S1,S2,...", help="run once per seed (DIR/seed-N each) and report mean ± std")
    run.add_argument("--resume", action="store_true", help="continue the run in DIR from its last completed step")
    run.add_argument("--force", action="store_true",
                     help="recompute every stage in DIR; with --resume: accept a changed recipe")
    recipe_command("validate", "check a recipe and its plugins without training")

    models = commands.add_parser("models", help="list every registered model with its parameters and MACs")
    models.add_argument("--num-classes", type=int, default=10, metavar="C")
    models.add_argument("--image-size", type=int, default=96, metavar="S")
    models.add_argument("--width", type=float, default=1.0, metavar="W", help="channel multiplier for models that take one")
    models.add_argument("--json", action="store_true", help="a JSON list of {name, params, macs, ...}")
    models.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    bench = commands.add_parser("bench-models", help="params, MACs and measured latency of vgg19 and the SVGG models (table + PNG)")
    bench.add_argument("--models", default="", help="comma-separated model names (default: vgg19 and every SVGG)")
    bench.add_argument("--num-classes", type=int, default=10, metavar="C")
    bench.add_argument("--image-size", type=int, default=96, metavar="S")
    bench.add_argument("--width", type=float, default=1.0, metavar="W")
    bench.add_argument("--batch-sizes", default="1,128", metavar="B1,B2")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--repeats", type=int, default=10)
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    bench.add_argument("--output", default=".", metavar="DIR", help="where bench-models.png and .json go")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    plugins = commands.add_parser("plugins", help="list plugins and the components they provide")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    report = commands.add_parser("report", help="tables and plots of finished runs (writes RUN_DIR/plots/*.png)")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, e.g. runs/quickstart-20250101-120000")
    report.add_argument("--format", choices=["markdown", "json"], default="markdown", help="output format (default: markdown)")
    report.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _configure_logging() -> None:
    logger = logging.getLogger("pyramidkd")
    if not any(isinstance(h, _CurrentStderrHandler) for h in logger.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("pyramidkd: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _configure_logging()
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        from .stage import RunInterrupted

        if args.debug:
            traceback.print_exc()
        if isinstance(error, RunInterrupted):
            print(f"stopped: {error}", file=sys.stderr)
            return error.exit_code
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_run(args) -> int:
    from .runner import run_recipe

    if args.seeds:
        from .seeds import parse_seeds, run_seeds

        run_seeds(args.recipe, args.overrides, parse_seeds(args.seeds), output=args.output, quiet=args.quiet, force=args.force, resume=args.resume)
        return EXIT_OK
    run_recipe(args.recipe, args.overrides, output=args.output, quiet=args.quiet, force=args.force, resume=args.resume)
    return EXIT_OK


def cmd_validate(args) -> int:
    from .runner import dataset_context, prepare

    prepared = prepare(args.recipe, args.overrides)
    prepared.dataset.instantiate().check(dataset_context(prepared.recipe))
    print(f"{args.recipe}: ok — {len(prepared.stages)} stage(s): {', '.join(s.id for s in prepared.stages)}")
    for stage in prepared.stages:
        teachers = ", ".join(getattr(t, "stage_id", None) or getattr(t, "path", "?") for t in stage.teachers) or "-"
        print(f"  {stage.id}: model {stage.model.name}, loss {stage.loss.name}, teacher {teachers}, {stage.train.epochs} epochs")
    return EXIT_OK


def cmd_plugins(args) -> int:
    from .host import make_plugin_host, plugin_listing

    rows = plugin_listing(make_plugin_host())
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        version = f" {row['version']}" if row["version"] else ""
        print(f"{row['name']}  [{row['source']}: {row['distribution']}{version}]")
        for kind, names in row["components"].items():
            print(f"    {kind}: {', '.join(names)}")
    return EXIT_OK


def cmd_models(args) -> int:
    from .modelinfo import models_command

    return models_command(args)


def cmd_bench_models(args) -> int:
    from .benchmodels import bench_models_command

    return bench_models_command(args)


def cmd_report(args) -> int:
    from .report import report_command

    return report_command(args)


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "plugins": cmd_plugins, "models": cmd_models, "report": cmd_report,
            "bench-models": cmd_bench_models}


if __name__ == "__main__":
    sys.exit(main())
