"""The sweep folder: its lock, the stored definition (``sweep.json``: a folder
holds one sweep), the runs' states (``sweep-state.json``) and where each run's
folder and log lie. Run folders themselves are ordinary run folders.
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any

from ..errors import RunDirectoryError
from ..rundir import atomic_write_json, folder_lock

DEFINITION_FILE = "sweep.json"
STATE_FILE = "sweep-state.json"
LOCK_FILE = ".sweep-lock"
LOGS = "logs"
SCRATCH = ".launcher"
# The state file only notes how each run ended: finished runs are known from their folders.
STATE_FIX = f"delete {STATE_FILE} and run the same command again (finished runs are found from their folders)"
# What a `run --seeds` folder written before sweeps existed holds besides its runs.
_SEEDS_FOLDER_FILES = ("seeds-summary.json", "results.json", "results.csv", "results.md", "plots")


def run_key(cell_id: str, seed: int) -> str:
    return f"{cell_id}/seed-{seed}"


class SweepFolder:
    """A sweep's folder; a search's folder (engine/search) shares its layout and
    overrides the class attributes below."""

    noun = "sweep"
    definition_file = DEFINITION_FILE
    lock_file = LOCK_FILE
    unreadable_fix = f"restore or delete {DEFINITION_FILE} (--force writes it anew)"
    own_entries = (LOGS, SCRATCH)  # besides the lock and the definition: a folder holding only these is empty

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def run_folder(self, cell_folder: str, seed: int) -> str:
        return os.path.join(self.path, cell_folder, f"seed-{seed}")

    def log_file(self, cell_id: str, seed: int) -> str:
        return self.file(LOGS, f"{cell_id}.seed-{seed}.log")

    def lock(self):
        return folder_lock(self.path, self.lock_file, f"another {self.noun} is writing this folder",
                           "wait for it to finish or stop it, or choose another --output")

    def stored_definition(self) -> dict[str, Any] | None:
        path = self.file(self.definition_file)
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError) as error:
            raise RunDirectoryError(f"cannot read {self.definition_file}: {error}", file=path,
                                    fix=self.unreadable_fix) from error

    def adopt(self, definition: dict[str, Any], comparable, *, force: bool, seeds_only: bool = False) -> None:
        """Take the folder for this sweep: new, or holding the same sweep (``comparable``
        turns a definition into the text that must match); a different sweep is
        refused with a diff unless ``force``."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunDirectoryError("exists and is not a folder", file=self.path, fix="choose another --output")
        stored = self.stored_definition()
        if stored is None and os.path.isdir(self.path) and not self.empty_enough(seeds_only):
            raise RunDirectoryError("the folder is not empty and holds no sweep", file=self.path,
                                    fix="choose another --output, or empty that folder")
        if stored is not None and comparable(stored) != comparable(definition) and not force:
            diff = "".join(difflib.unified_diff(comparable(stored).splitlines(True), comparable(definition).splitlines(True),
                                                f"stored {DEFINITION_FILE}", "this sweep", n=1))
            raise RunDirectoryError(f"the folder holds a different sweep:\n{diff.rstrip()}", file=self.path,
                                    fix="choose another --output, or add --force to continue it with this sweep "
                                        "(runs of unchanged cells are kept)")
        os.makedirs(self.path, exist_ok=True)
        if stored != definition:
            atomic_write_json(self.file(DEFINITION_FILE), definition)

    def empty_enough(self, seeds_only: bool = False) -> bool:
        """Holds nothing but the folder's own entries (and, with ``seeds_only``, a ``run --seeds`` folder's)."""
        entries = [name for name in os.listdir(self.path) if name not in (self.lock_file, *self.own_entries)]
        if seeds_only:  # a `run --seeds` folder from before sweeps: its seed-N runs continue
            entries = [name for name in entries if not name.startswith("seed-") and name not in _SEEDS_FOLDER_FILES]
        return not entries

    def read_state(self) -> dict[str, dict[str, Any]]:
        """Each run's record by ``"<cell id>/seed-N"`` (empty before the first run ends).
        A damaged file is an error: it holds the failed runs' errors, which a sweep
        would otherwise lose without a word."""
        path = self.file(STATE_FILE)
        try:
            with open(path, encoding="utf-8") as handle:
                state = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise RunDirectoryError(f"cannot read {STATE_FILE}: {error}", file=path, fix=STATE_FIX) from error
        runs = state.get("runs") if isinstance(state, dict) else None
        if not isinstance(runs, dict):
            raise RunDirectoryError(f"{STATE_FILE} has no table of runs", file=path, fix=STATE_FIX)
        return dict(runs)

    def write_state(self, runs: dict[str, dict[str, Any]]) -> None:
        atomic_write_json(self.file(STATE_FILE), {"runs": runs})
