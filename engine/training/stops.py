"""Stopping a run: errors that end training, the signal flag, the resume command.

The first SIGINT/SIGTERM sets a flag; the loop finishes its step (under torchrun:
the steps up to the next check, where the ranks agree, see :class:`StepChecks`),
saves ``last`` and raises :class:`RunInterrupted`. A second signal stops at once,
with the same message about the state at the last save.
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
import torch

from ..distributed import World, all_reduce_max
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
    """Set by the SIGINT/SIGTERM handlers; read on the host after every forward (:class:`StepChecks`).

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


class LossWatch:
    """The non-finite-loss check, kept on the device: :meth:`add` costs no
    host-device sync (the loop reads the check only every few steps); it holds the
    step and value of the first non-finite loss since the last :meth:`reset`."""

    def __init__(self, device: torch.device):
        self.first = torch.zeros(2, dtype=torch.float64, device=device)  # [step (0: none), loss]

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().double().reshape(())
        fresh = ~torch.isfinite(loss) & (self.first[0] == 0)
        self.first.copy_(torch.where(fresh, torch.stack([torch.full_like(loss, step), loss]), self.first))

    def flag(self) -> torch.Tensor:
        """[1.0] when a non-finite loss was seen, else [0.0] (on the device, for an all-reduce)."""
        return (self.first[:1] > 0).double()

    def read(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss, or ``None``. Sync point: waits for the device."""
        step, loss = self.first.tolist()
        return (int(step), loss) if step else None

    def reset(self) -> None:
        self.first.zero_()


# Steps between the host's reads of the non-finite-loss check (and, under DDP, of the
# ranks' stop signals): each read waits for the device to finish its queued work.
CHECK_EVERY = 16


class StepChecks:
    """One epoch's per-step decisions: has a loss been non-finite (on any rank), and
    was a stop requested (on any rank)? Every rank decides alike.

    The loss check stays on the device (:class:`LossWatch`); the host reads it (a
    sync point) every :data:`CHECK_EVERY` steps and at the epoch's last step, or
    every step for ``on_nan = "skip-batch"``, which must know before it steps. Stop
    signals are read on the host every step; under DDP the ranks agree on both when
    the check is read (one all-reduce), so there a stop waits for that step."""

    def __init__(self, world: World, device: torch.device, stop: StopFlag, stage, last_path: str):
        self.world, self.device, self.stop, self.stage, self.last_path = world, device, stop, stage, last_path
        self.watch = LossWatch(device)

    def after_step(self, loss: torch.Tensor, step: int, num_steps: int) -> tuple[bool, bool]:
        """(bad loss, stop) after the forward of ``step``."""
        self.watch.add(loss, step)
        stop = self.stop.signum is not None
        if not (self.stage.train.on_nan == "skip-batch" or step % CHECK_EVERY == 0 or step == num_steps):
            return False, stop and not self.world.distributed
        if not self.world.distributed:
            return self.watch.read() is not None, stop
        flags = torch.cat([self.watch.flag(), torch.full((1,), float(stop), dtype=torch.float64, device=self.device)])
        bad_loss, stop = all_reduce_max(self.world, flags).tolist()  # collective + sync point
        return bool(bad_loss), bool(stop)

    def nan_error(self, epoch: int, step: int) -> TrainingError:
        """The stop for a non-finite loss, at the step it happened; the check runs every
        few steps, so when it found it later (or on another rank) the message says so."""
        first = self.watch.read()
        where, what = (f"step {step}", "non-finite on another rank") if first is None else (f"step {first[0]}", f"{first[1]}")
        message = f"stage {self.stage.id!r}, epoch {epoch}, {where}: the loss is {what}; training stopped"
        if first is None or first[0] != step:
            message += (f" (found by the check at step {step}: the loss is read every {CHECK_EVERY} steps and at the end of "
                        "an epoch, not every step, so as not to wait for the GPU)")
        return TrainingError(message, fix='lower the learning rate or check the data; the last good checkpoint is kept '
                             f'({os.path.relpath(self.last_path)}); on_nan = "skip-batch" skips such batches')


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
