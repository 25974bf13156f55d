"""The sweep's live view: runs done / running / failed / waiting and the time
left, from what every launcher leaves in the shared run folders (a run's ``.lock``
names its process while it trains; its ``metrics.jsonl`` counts finished epochs),
so it works the same for child processes, Ray tasks and Slurm jobs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

import attrs

from ..formatting import format_duration, is_terminal
from ..rundir import LOCK_FILE, lock_held


@attrs.define
class TrackedRun:
    key: str
    folder: str
    epochs: int  # planned epochs over all its stages
    state: str = "waiting"  # waiting | running | done | failed | finished-before


def epochs_done(folder: str) -> int:
    """Epoch records the run has written so far (its files logger's metrics.jsonl)."""
    try:
        with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as handle:
            return sum(1 for line in handle if '"kind": "epoch"' in line)
    except OSError:
        return 0


def is_running(folder: str) -> bool:
    """Whether a process holds the run's lock (``.lock`` names it while it runs)."""
    return lock_held(os.path.join(folder, LOCK_FILE))


class LiveView:
    """Redraws one status line (a terminal) or prints a line on each change
    (a log file) until :meth:`close`; :meth:`say` prints a message above it."""

    def __init__(self, name: str, runs: list[TrackedRun], stream: TextIO | None = None, interval: float = 1.0):
        self.name, self.runs = name, {run.key: run for run in runs}
        self.stream = stream or sys.stderr
        self.terminal = is_terminal(self.stream)
        self.interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.time()
        self._initial = self._progress()
        self._last_line = ""
        self._last_print = 0.0
        self._thread = threading.Thread(target=self._loop, name="sweep-live-view", daemon=True)

    def __enter__(self) -> "LiveView":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self._draw(force=True)
            if self.terminal and self._last_line:
                self.stream.write("\n")
                self.stream.flush()

    def mark(self, key: str, state: str, message: str | None = None) -> None:
        with self._lock:
            self.runs[key].state = state
            if message:
                self._write_above(message)
            self._draw()

    def say(self, message: str) -> None:
        with self._lock:
            self._write_above(message)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                self._draw()

    def _progress(self) -> int:
        total = 0
        for run in self.runs.values():
            if run.state in ("done", "finished-before"):
                total += run.epochs
            else:
                total += min(run.epochs, epochs_done(run.folder))
        return total

    def status_line(self) -> str:
        counts = dict.fromkeys(("done", "running", "failed", "waiting"), 0)
        for run in self.runs.values():
            state = run.state
            if state == "finished-before":
                state = "done"
            elif state == "waiting" and is_running(run.folder):
                state = "running"
            counts[state] += 1
        planned = sum(run.epochs for run in self.runs.values())
        progress = self._progress()
        elapsed = time.time() - self._started
        gained = progress - self._initial
        left = planned - progress
        if counts["running"] + counts["waiting"] == 0:
            eta = "finished"
        elif gained > 0 and elapsed > 0:
            eta = f"about {format_duration(left * elapsed / gained)} left"
        else:
            eta = "time left: estimating"
        return (f"sweep {self.name}: {counts['done']} done, {counts['running']} running, {counts['failed']} failed, "
                f"{counts['waiting']} waiting; {progress}/{planned} epochs; {format_duration(elapsed)} so far, {eta}")

    def _draw(self, force: bool = False) -> None:
        line = self.status_line()
        if self.terminal:
            self.stream.write("\r\x1b[2K" + line)
            self.stream.flush()
            self._last_line = line
            return
        # A log file gets a line when the counts change, or once a minute.
        counts = line.split(";")[0]
        now = time.time()
        if (force and line != self._last_line) or counts != self._last_line.split(";")[0] or now - self._last_print > 60:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_line, self._last_print = line, now

    def _write_above(self, message: str) -> None:
        if self.terminal:
            self.stream.write("\r\x1b[2K")
        self.stream.write(message + "\n")
        self.stream.flush()
        if self.terminal:
            self._last_line = ""
