"""Where a stage stands (:class:`Progress`): saved in its ``last`` checkpoint
(:func:`.checkpoints.last_checkpoint`) and restored on resume."""

from __future__ import annotations

import math

import attrs
import torch

from ..records import EpochRecord


@attrs.define
class Progress:
    """Where a stage stands; saved in ``last`` and restored on resume."""

    epoch: int = 0  # last epoch completely done
    step: int = 0  # steps done in epoch+1 (mid-epoch save), 0 at an epoch boundary
    best_score: float = -math.inf
    best_epoch: int = 0
    best_val_acc: float = 0.0
    history: list[EpochRecord] = attrs.field(factory=list)  # this stage's epoch records
    skipped_batches: int = 0
    # mid-epoch only: running sums and the loader state the epoch started from
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    epoch_loader_state: torch.Tensor | None = None

    def end_epoch(self, epoch: int) -> None:
        """An epoch is complete: the position moves to its end, running sums reset."""
        self.epoch, self.step, self.skipped_batches = epoch, 0, 0
        self.loss_sum, self.correct, self.seen, self.epoch_loader_state = 0.0, 0, 0, None
