"""Stopping a run: errors that end training, the signal flag, the resume command.

The first SIGINT/SIGTERM sets a flag; the loop finishes its step, saves ``last``
and raises :class:`RunInterrupted`. A second signal stops at once, with the same
message about the state at the last save.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
from typing import Sequence

import attrs

from ..errors import UserError


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss became NaN)."""


class RunInterrupted(UserError):
    """SIGINT/SIGTERM: the state was saved; the message says how to resume."""

    def __init__(self, message: str, *, signum: int, fix: str):
        super().__init__(message, fix=fix)
        self.exit_code = 128 + signum


class ImmediateStop(KeyboardInterrupt):
    """A second signal. A KeyboardInterrupt, so that no ``except Exception`` on the
    way up (a plugin hook, a checkpoint reader) swallows it; the runner turns it
    into its :class:`RunInterrupted`."""

    def __init__(self, error: RunInterrupted):
        super().__init__(str(error))
        self.error = error


@attrs.define
class SavedPosition:
    """Where the last save of the running stage left it."""

    path: str
    epoch: int  # epochs completely done
    step: int  # steps done in the next epoch (0 at an epoch boundary)
    num_steps: int | None = None


class StopFlag:
    """Set by the SIGINT/SIGTERM handlers; checked after every optimisation step.

    The runner keeps it told which stage runs and what was saved last, so that a
    stop, first or second, says the same thing.
    """

    def __init__(self, resume_command: str = ""):
        self.signum: int | None = None
        self.resume_command = resume_command
        self.stage_id: str | None = None
        self.saved: SavedPosition | None = None

    def request(self, signum, frame=None):
        if self.signum is not None:  # a second signal: stop now
            raise ImmediateStop(self.interrupted(signum, immediate=True))
        self.signum = signum

    def enter_stage(self, stage_id: str) -> None:
        self.stage_id, self.saved = stage_id, None

    def record_save(self, position: SavedPosition) -> None:
        self.saved = position

    def interrupted(self, signum: int | None = None, *, immediate: bool = False) -> RunInterrupted:
        signum = signum or self.signum or signal.SIGTERM
        name = signal.Signals(signum).name
        head = f"interrupted by {name}" + (" twice: stopped at once" if immediate else "")
        if self.stage_id is None:
            state = "no stage was training; completed stages are kept"
        elif self.saved is None:
            state = f"in stage {self.stage_id!r}; nothing of it was saved yet (it starts over), earlier stages are kept"
        else:
            saved = self.saved
            steps = f"/{saved.num_steps}" if saved.num_steps else ""
            where = f"epoch {saved.epoch + 1}, step {saved.step}{steps}" if saved.step else f"the end of epoch {saved.epoch}"
            state = f"in stage {self.stage_id!r}, {where}; the state is saved in {saved.path}"
        return RunInterrupted(f"{head} {state}", signum=signum, fix=f"resume with: {self.resume_command}")


def resume_command(recipe_file: str, output: str, overrides: Sequence[str] = (), max_epochs: int | None = None,
                   argv0: str | None = None) -> str:
    """A shell command that continues this run when pasted in the same folder."""
    words = _executable(sys.argv[0] if argv0 is None else argv0) + ["run", _shown_path(recipe_file)]
    for override in overrides:
        words += ["--set", override]
    if max_epochs is not None:
        words += ["--max-epochs", str(max_epochs)]
    words += ["--output", _shown_path(output), "--resume"]
    return shlex.join(words)


def _executable(argv0: str) -> list[str]:
    """How this process was started: the ``pyramidkd`` script by the path it was
    run from (bare when PATH finds that same script), else ``python -m pyramidkd``."""
    if os.path.basename(argv0) == "pyramidkd" and os.path.isfile(argv0):
        found = shutil.which("pyramidkd")
        if found and os.path.realpath(found) == os.path.realpath(argv0):
            return ["pyramidkd"]
        return [_shown_path(argv0, command=True)]
    return [_shown_path(sys.executable, command=True), "-m", "pyramidkd"]


def _shown_path(path: str, *, command: bool = False) -> str:
    """Relative to the current folder when inside it, else absolute. A command
    needs a slash, or the shell looks it up on PATH."""
    absolute = os.path.abspath(path)
    cwd = os.getcwd()
    if absolute.startswith(cwd.rstrip(os.sep) + os.sep):
        relative = os.path.relpath(absolute, cwd)
        return f".{os.sep}{relative}" if command and os.sep not in relative else relative
    return absolute


class signals_to:
    """Route SIGINT/SIGTERM to a stop flag while a run trains (main thread only):
    the current step finishes, ``last`` is saved, and the run exits cleanly."""

    def __init__(self, stop: StopFlag):
        self.stop = stop
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.stop.request)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False
