"""What every report reads from a run folder: the epoch records, the MACs of a
stage's best model (rebuilt from its checkpoint), the plugin hosts to rebuild it
with; and where a report's plots go."""

from __future__ import annotations

import os
import re
import tomllib
from typing import Sequence

from ..errors import UnsafeCheckpointError, UserError
from ..records import EpochRecord, RunSummary, StageResult, read_metrics
from ..rundir import RECIPE_FILE

PLOTS_DIR = "plots"
CHAIN_PLOT = "accuracy_vs_params.png"
METRICS_FILE = "metrics.jsonl"


def load_epoch_records(run_dir: str) -> dict[str, list[EpochRecord]] | None:
    """Epoch records by stage id, in epoch order (None when there is no metrics.jsonl)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    by_stage: dict[str, dict[int, EpochRecord]] = {}
    for record in read_metrics(path):
        if isinstance(record, EpochRecord) and record.stage:
            by_stage.setdefault(record.stage, {})[record.epoch] = record  # the last record of an epoch wins
    return {stage: [epochs[e] for e in sorted(epochs)] for stage, epochs in by_stage.items()}


def is_chain(stages: Sequence[StageResult]) -> bool:
    """More than two stages, or several stages planned by one recipe entry."""
    entries = [stage.entry or stage.stage for stage in stages]
    return len(stages) > 2 or len(set(entries)) < len(entries)


def plot_file(run_dir: str, name: str) -> str:
    """``RUN_DIR/plots/<name>.png``, the name made safe for a file name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "stage"
    return os.path.join(run_dir, PLOTS_DIR, f"{safe}.png")


class Hosts:
    """Plugin hosts to rebuild models with, built on first use: one with the
    recipe's local plugin modules where it has any, else the plain one."""

    def __init__(self):
        self._cache: dict[tuple | None, object] = {}

    def for_run(self, run_dir: str, summary: RunSummary):
        modules: tuple[str, ...] = ()
        try:
            with open(os.path.join(run_dir, RECIPE_FILE), "rb") as handle:
                modules = tuple((tomllib.load(handle).get("experiment") or {}).get("plugins") or ())
        except (OSError, tomllib.TOMLDecodeError, AttributeError):
            pass
        search = os.path.dirname(summary.recipe or "") or None
        key = (modules, search) if modules else None
        if key not in self._cache:
            self._cache[key] = self._with_modules(modules, search) if modules else self._plain()
        return self._cache[key]

    def _plain(self):
        from ..host import make_plugin_host

        if None not in self._cache:
            self._cache[None] = make_plugin_host()
        return self._cache[None]

    def _with_modules(self, modules: tuple[str, ...], search: str | None):
        from ..host import make_plugin_host

        try:
            return make_plugin_host(modules, local_search_path=search)
        except UserError:  # the modules moved or broke: built-in and installed models still work
            return self._plain()


def stage_macs(run_dir: str, stage: StageResult, host) -> tuple[int | None, str | None]:
    """MACs of the stage's best model for one input (rebuilt from its checkpoint),
    or None and the reason."""
    from ..training.checkpoints import load_checkpoint
    from ..training.models import count_macs, model_from_checkpoint

    if not stage.checkpoint:
        return None, f"stage {stage.stage!r}: no checkpoint recorded"
    path = os.path.join(run_dir, stage.checkpoint)
    try:
        model, description = model_from_checkpoint(load_checkpoint(path), path, host)
        return count_macs(model, tuple(description["input_shape"])), None
    except UnsafeCheckpointError:
        raise  # a file that would run code is an error, not a missing number
    except UserError as error:
        return None, f"stage {stage.stage!r}: no MACs ({error.message})"
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        return None, f"stage {stage.stage!r}: no MACs ({type(error).__name__}: {error})"
