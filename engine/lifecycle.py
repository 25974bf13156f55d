"""The run as lifecycle hooks see it (:class:`Run`, the ``run`` argument of every
``pyramidkd_run_*``, ``pyramidkd_stage_*``, ``pyramidkd_batch_end``,
``pyramidkd_epoch_end`` and ``pyramidkd_metrics`` call, see
:mod:`~pyramidkd.engine.hookspecs`).

Apart from :mod:`~pyramidkd.engine.runner`, which builds it, so that the hook
specifications can name its type without importing the runner.
"""

from __future__ import annotations

import time

import attrs
import torch

from .components import DataSplits, StagePlan
from .distributed import World
from .recipe import Recipe
from .records import EpochRecord, StageResult
from .registries import PluginHost
from .rundir import RunDirectory


@attrs.define
class Run:
    """What lifecycle hooks receive as ``run``."""

    recipe: Recipe
    directory: RunDirectory
    device: torch.device
    stages: list[StagePlan]
    host: PluginHost
    data: DataSplits
    quiet: bool
    seed: int
    world: World = attrs.field(factory=World)
    results: dict[str, StageResult] = attrs.field(factory=dict)
    started: float = attrs.field(factory=time.time)
    completed: set[str] = attrs.field(factory=set)  # stages reused from an earlier run (same fingerprint)
    resume_stage: str | None = None  # the stage continued from its `last` checkpoint
    resume_history: list[EpochRecord] = attrs.field(factory=list)  # its epoch records so far
    fingerprints: dict[str, str] = attrs.field(factory=dict)  # stage id -> fingerprint of its plan
    pipeline: str = "dataloader"  # the pipeline chosen for this run: "tensor" or "dataloader" (engine/data/pipeline.py)

    def reference_for(self, stage: StagePlan) -> float | None:
        """The published accuracy for a stage: by its id, or by its entry's id when
        it is that entry's final stage."""
        reference = self.recipe.reference
        if stage.id in reference:
            return reference[stage.id]
        last_of_entry = [s.id for s in self.stages if s.entry_id == stage.entry_id][-1]
        return reference.get(stage.entry_id) if stage.id == last_of_entry else None

    def call(self, hook_name: str, on_error=None, **kwargs) -> None:
        """Call a lifecycle hook; a plugin that raises is named (after ``on_error``
        has saved the run state)."""
        if self.world.is_main:  # loggers and callbacks live on rank 0 only
            self.host.call(hook_name, on_error=on_error, run=self, **kwargs)
