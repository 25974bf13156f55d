"""The ``pyramidkd`` command line: the entry point and nothing else.

The commands live in :mod:`pyramidkd.engine.commands`, one module each, and are
registered through the ``pyramidkd_register_commands`` hook (plugins can add
their own). This module builds the parser from them, runs the chosen one and
turns errors into exit codes: 0 ok, 1 bad input (a short message naming file, key
and fix; the traceback only with ``--debug``), 2 usage, 128 + signal number for a
run stopped by SIGINT (130) or SIGTERM (143).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Iterable, Sequence

from .commands import Commands, build_parser, builtin_commands, collect_commands
from .commands.registry import BUILTIN_PLUGIN
from .errors import UserError
from .formatting import above_progress_bars, clear_progress_bars

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT

log = logging.getLogger("pyramidkd")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def emit(self, record):
        with above_progress_bars():  # a warning mid-epoch is not glued to the bar
            super().emit(record)


def _configure_logging() -> None:
    if not any(isinstance(h, _CurrentStderrHandler) for h in log.handlers):
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("pyramidkd: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def load_commands(extra_plugins: Iterable[object] = ()) -> Commands:
    """The commands of every installed plugin (built-ins first); the built-ins alone,
    with a warning, when the plugins cannot be loaded (the command then reports the
    problem itself if it needs them)."""
    from .host import make_plugin_host

    try:
        return collect_commands(make_plugin_host(extra_plugins=extra_plugins))
    except UserError as error:
        log.warning("plugin commands are unavailable: %s", error)
        return builtin_commands()


def main(argv: Sequence[str] | None = None, *, extra_plugins: Iterable[object] = ()) -> int:
    """Run ``pyramidkd ARGV...`` and return its exit code. ``extra_plugins`` (modules or
    objects) are registered next to the installed ones, e.g. to add a command in a test."""
    _configure_logging()
    commands = load_commands(extra_plugins)
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    command = commands.get(args.command)
    debug = getattr(args, "debug", False)
    try:
        code = command.run(args)
        sys.stdout.flush()  # a reader that has gone (`| head`) shows here, in the handler below
        return EXIT_OK if code is None else int(code)
    except UserError as error:
        return _report(f"error: {error}", EXIT_BAD_INPUT, debug, error)
    except KeyboardInterrupt:  # a second Ctrl-C the runner did not turn into a stop message
        return _report("interrupted", EXIT_INTERRUPTED, debug)
    except BrokenPipeError:  # `pyramidkd validate R | head`: the reader has gone, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return EXIT_OK
    except Exception as error:
        if command.plugin == BUILTIN_PLUGIN:
            raise  # a bug in pyramidkd: the traceback is the report
        return _report(f"error: command {command.name!r} from plugin {command.plugin!r} raised {type(error).__name__}: {error}\n"
                       f"  fix: fix or disable the plugin {command.plugin!r} (run with --debug for the traceback)",
                       EXIT_BAD_INPUT, debug)


def _report(message: str, code: int, debug: bool, error: BaseException | None = None) -> int:
    from .training.stops import RunInterrupted

    clear_progress_bars()  # the message starts on a clean line, not after a progress bar
    if debug:
        traceback.print_exc()
    if isinstance(error, RunInterrupted):
        message, code = f"stopped: {error}", error.exit_code
    print(message, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
