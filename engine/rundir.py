"""The run directory: resolved recipe, manifest, metrics, checkpoints, summary.

Everything is written atomically (temporary file in the same folder, flush,
fsync, rename), so a crash never leaves a half-written checkpoint or JSON file
under its final name.
"""

from __future__ import annotations

import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from .errors import CheckpointError, RunDirectoryError

RECIPE_FILE = "recipe.toml"
MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FORMAT = "pyramidkd-checkpoint"


def atomic_write_bytes(path: str, payload: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def save_checkpoint(path: str, checkpoint: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError("checkpoint file not found", file=path, fix="check the path, or re-run the stage that writes it")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(
            f"cannot read the checkpoint ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); the file is corrupt or truncated",
            file=path,
            fix="delete it and re-run the stage that writes it (pyramidkd run ... --force)",
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            "not a pyramidkd checkpoint (no model description inside)",
            file=path,
            fix="use a checkpoint written by pyramidkd (checkpoints/<stage>/best.pt of a run)",
        )
    return checkpoint


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

    def prepare(self, recipe_text: str) -> bool:
        """Create the folder, or accept it if it holds the same recipe.

        Returns True when the folder already held this run (completed stages are
        then reused). Refuses a folder holding anything else.
        """
        stored = self.file(RECIPE_FILE)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunDirectoryError("exists and is not a folder", file=self.path, fix="choose another --output")
        if os.path.isdir(self.path) and os.listdir(self.path):
            if not os.path.exists(stored):
                raise RunDirectoryError(
                    "the output folder is not empty and holds no pyramidkd run",
                    file=self.path,
                    fix="choose another --output, or empty that folder",
                )
            with open(stored, encoding="utf-8") as handle:
                previous = handle.read()
            if previous != recipe_text:
                raise RunDirectoryError(
                    "the output folder holds a different run (its recipe.toml differs from this recipe with its --set overrides)",
                    file=self.path,
                    fix="choose another --output, or repeat the same recipe and overrides to continue that run",
                )
            return True
        try:
            os.makedirs(self.path, exist_ok=True)
            atomic_write_text(stored, recipe_text)
        except OSError as error:
            raise RunDirectoryError(f"cannot write the output folder: {error.strerror}", file=self.path, fix="choose a writable --output") from error
        return False

    def write_manifest(self, *, seed: int, device: str, recipe_file: str, started: float, finished: float | None, argv: list[str]) -> None:
        from pyramidkd import __version__

        manifest = {
            "pyramidkd_version": __version__,
            "git_commit": git_commit(os.path.dirname(os.path.abspath(recipe_file))),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "hostname": socket.gethostname(),
            "device": device,
            "seed": seed,
            "recipe_file": os.path.abspath(recipe_file),
            "command": argv,
            "started": _iso(started),
            "finished": _iso(finished) if finished else None,
        }
        atomic_write_json(self.file(MANIFEST_FILE), manifest)


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))


def default_output_dir(name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{name}-{stamp}")


def command_line() -> list[str]:
    return [os.path.basename(sys.argv[0])] + sys.argv[1:]
