"""The run directory: resolved recipe, manifest, metrics, checkpoints, summary.

Everything is written atomically (temporary file in the same folder, flush,
fsync, rename), so a crash never leaves a half-written checkpoint or JSON file
under its final name; the files get the mode the user's umask gives, like any
other file. Checkpoint files themselves: :mod:`pyramidkd.engine.training.checkpoints`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import difflib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, BinaryIO, Callable

import torch

from .errors import RunDirectoryError

log = logging.getLogger("pyramidkd")

LOCK_FILE = ".lock"
RECIPE_FILE = "recipe.toml"
MANIFEST_FILE = "manifest.json"


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(handle)`` so that ``path`` is either the old or
    the new file, never a partial one: a temporary file in the same folder with the
    umask's mode, fsync, rename, fsync of the folder. An ``OSError`` leaves the
    previous file in place and is raised as it is."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp creates 0600; give the file the mode open() would (the umask's)
        os.fchmod(descriptor, 0o666 & ~current_umask())
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        temporary = None
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
    with contextlib.suppress(OSError):  # make the rename itself durable
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """:func:`atomic_write` of ``payload``; a write error (disk full, read-only) is
    reported with the path and leaves the previous file in place."""
    try:
        atomic_write(path, lambda handle: _write_all(handle, payload))
    except OSError as error:
        reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise RunDirectoryError(
            f"cannot write {os.path.basename(path)}: {reason}; the previous version (if any) is intact",
            file=path,
            fix="free disk space or choose a writable --output, then continue with --resume",
        ) from error


def _write_all(handle, payload: bytes) -> None:
    handle.write(payload)


_FALLBACK_UMASK: list[int] = []


def current_umask() -> int:
    """The process umask, read without changing it where the kernel tells it
    (/proc, Linux 4.7+); elsewhere read once by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    if not _FALLBACK_UMASK:
        previous = os.umask(0o022)
        os.umask(previous)
        _FALLBACK_UMASK.append(previous)
    return _FALLBACK_UMASK[0]


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def git_commit(folder: str) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class RunDirectory:
    """Paths and writers of one run's output folder."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def stage_dir(self, stage_id: str) -> str:
        return self.file("checkpoints", stage_id)

    def checkpoint(self, stage_id: str, which: str = "best") -> str:
        return os.path.join(self.stage_dir(stage_id), f"{which}.pt")

    def stage_result_file(self, stage_id: str) -> str:
        return os.path.join(self.stage_dir(stage_id), "result.json")

    def stage_result(self, stage_id: str) -> dict | None:
        path = self.stage_result_file(stage_id)
        if not (os.path.exists(path) and os.path.exists(self.checkpoint(stage_id))):
            return None
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    def prepare(self, recipe_text: str, *, resume: bool = False, force: bool = False) -> bool:
        """Create the folder, or accept it if it holds the same recipe.

        Returns True when the folder already held this run (its completed stages
        are then reused). A folder holding anything else is refused; a changed
        recipe is refused with a diff unless ``force``.
        """
        stored = self.file(RECIPE_FILE)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunDirectoryError("exists and is not a folder", file=self.path, fix="choose another --output")
        existing = os.path.isdir(self.path) and os.path.exists(stored)
        if resume and not existing:
            raise RunDirectoryError("there is no run to resume here (no recipe.toml)", file=self.path,
                                    fix="check --output, or drop --resume to start a new run")
        if os.path.isdir(self.path) and _entries(self.path) and not existing:
            raise RunDirectoryError(
                "the output folder is not empty and holds no pyramidkd run",
                file=self.path,
                fix="choose another --output, or empty that folder",
            )
        if existing:
            with open(stored, encoding="utf-8") as handle:
                previous = handle.read()
            if previous != recipe_text and not force:
                diff = "".join(difflib.unified_diff(previous.splitlines(True), recipe_text.splitlines(True), "stored recipe.toml", "this recipe", n=0))
                if resume:
                    message = f"the recipe differs from the one this run was started with:\n{diff}"
                    fix = "resume with the same recipe and --set values, or add --force to continue with the changed recipe"
                else:
                    message = f"the output folder holds a different run (its recipe.toml differs from this recipe with its --set overrides):\n{diff}"
                    fix = "choose another --output, or repeat the same recipe and overrides to continue that run (--force overwrites it)"
                raise RunDirectoryError(message.rstrip(), file=self.path, fix=fix)
            if previous != recipe_text:
                atomic_write_text(stored, recipe_text)
            return True
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as error:
            raise RunDirectoryError(f"cannot create the output folder: {error.strerror}", file=self.path, fix="choose a writable --output") from error
        atomic_write_text(stored, recipe_text)
        return False

    def lock(self):
        """Hold ``.lock`` while the run writes this folder."""
        return folder_lock(self.path, LOCK_FILE, "another run is writing this folder",
                           "wait for it to finish, stop it, or choose another --output")

    def write_manifest(self, *, seed: int, device: str, recipe_file: str, started: float, finished: float | None, argv: list[str],
                       world_size: int = 1) -> None:
        from pyramidkd._version import __version__

        manifest = {
            "pyramidkd_version": __version__,
            "git_commit": git_commit(os.path.dirname(os.path.abspath(recipe_file))),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "hostname": socket.gethostname(),
            "device": device,
            "world_size": world_size,
            "seed": seed,
            "recipe_file": os.path.abspath(recipe_file),
            "command": argv,
            "started": _iso(started),
            "finished": _iso(finished) if finished else None,
        }
        atomic_write_json(self.file(MANIFEST_FILE), manifest)



LOCK_OWNER = "pid {pid} on {host}"  # what a held lock file says


def lock_held(path: str) -> bool:
    """Whether the lock file ``path`` names a holder that may still run: a process
    killed on this host leaves its name behind, so a local pid is checked too.
    (Taking the lock to test it could make its owner, starting that instant,
    find the folder busy.)"""
    try:
        with open(path, encoding="utf-8") as handle:
            owner = handle.read().split()
    except OSError:
        return False
    if len(owner) == 4 and owner[0] == "pid" and owner[3] == socket.gethostname():
        try:
            os.kill(int(owner[1]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError):
            return True
    return bool(owner)


@contextlib.contextmanager
def folder_lock(folder: str, name: str, busy: str, fix: str):
    """Hold the flock file ``folder/name`` (released by the kernel if the process
    dies, so a stale lock from a dead process is simply taken over); ``busy`` and
    ``fix`` make the error when another live process holds it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RunDirectoryError("exists and is not a folder", file=folder, fix="choose another --output")
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(os.path.join(folder, name), "a+", encoding="utf-8")
    except OSError as error:
        raise RunDirectoryError(f"cannot use the output folder: {error.strerror}", file=folder, fix="choose a writable --output") from error
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise RunDirectoryError(f"{busy} ({owner})", file=folder, fix=fix) from None
        handle.seek(0)
        stale = handle.read().strip()
        if stale:
            log.info("taking over a stale lock (%s, no longer running)", stale)
        handle.seek(0)
        handle.truncate()
        handle.write(LOCK_OWNER.format(pid=os.getpid(), host=socket.gethostname()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()

def _entries(path: str) -> list[str]:
    """What a folder holds besides this engine's own lock and the temporaries of an
    atomic write that a killed process left behind (SIGKILL skips their clean-up):
    a run killed while it created its folder is then continued, not refused."""
    return [name for name in os.listdir(path) if name != LOCK_FILE and not _leftover_temporary(name)]


def _leftover_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # atomic_write's mkstemp names


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))


def default_output_dir(name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{name}-{stamp}")


def command_line() -> list[str]:
    return [os.path.basename(sys.argv[0])] + sys.argv[1:]
