"""Which stages a run reuses, which it recomputes (and why), which it resumes.

A run into a folder that already holds results reuses a completed stage only when
the fingerprint stored with it matches the stage as now planned, and continues an
interrupted stage from its ``last`` checkpoint only on a match too (see
:mod:`.fingerprint`).
"""

from __future__ import annotations

import logging
import os

import attrs

from ..components import StagePlan
from ..errors import RunDirectoryError
from ..records import EpochRecord, StageResult
from .checkpoints import load_checkpoint, saved_progress
from .fingerprint import change_reason

log = logging.getLogger("pyramidkd")


@attrs.define
class ReuseDecision:
    reused: dict[str, StageResult] = attrs.field(factory=dict)  # stage id -> its stored result
    changed: dict[str, str] = attrs.field(factory=dict)  # stage id -> why it is recomputed
    resume_stage: str | None = None
    resume_checkpoint: dict | None = None
    resume_epochs: int = 0  # the resumed stage's planned epochs

    @property
    def resume_history(self) -> list[EpochRecord]:
        if self.resume_checkpoint is None:
            return []
        return saved_progress(self.resume_checkpoint).history

    def messages(self) -> list[str]:
        """One line for the recomputed stages, one for a resumed stage."""
        lines = []
        changed = {stage: why for stage, why in self.changed.items() if stage != self.resume_stage}
        if changed:
            listed = "; ".join(f"{stage} ({why})" for stage, why in changed.items())
            lines.append(f"recomputing {len(changed)} stage(s) whose inputs changed: {listed}")
        if self.resume_stage is not None:
            progress = saved_progress(self.resume_checkpoint)
            epoch, step = progress.epoch + 1, progress.step
            reused = ", ".join(self.reused) or "none"
            if epoch > self.resume_epochs:
                what = f"finishing stage {self.resume_stage!r} (all {self.resume_epochs} epoch(s) were done; testing its best checkpoint)"
            else:
                done = f"epoch {epoch} was interrupted after step {step}" if step else f"{epoch - 1} epoch(s) done"
                what = f"resuming stage {self.resume_stage!r} from epoch {epoch}, step {step + 1} ({done})"
            lines.append(f"{what}; reused stages: {reused}")
        return lines


def decide_reuse(directory, stages: list[StagePlan], fingerprints: dict[str, str], *, recompute: bool) -> ReuseDecision:
    """``directory`` is the :class:`~pyramidkd.engine.rundir.RunDirectory`;
    ``recompute`` (``--force`` without ``--resume``) reuses nothing. Only the first
    stage not reused may continue from its ``last`` checkpoint (a run trains its
    stages in order, so no later one was interrupted)."""
    decision = ReuseDecision()
    if recompute:
        return decision
    first_to_train = True
    for stage in stages:
        stored = directory.stage_result(stage.id)
        result = StageResult.from_dict(stored) if stored is not None else None
        if result is not None and result.fingerprint == fingerprints[stage.id]:
            decision.reused[stage.id] = result
            continue
        if result is not None:
            decision.changed[stage.id] = change_reason(stage, result, set(decision.changed))
        if first_to_train:
            first_to_train = False
            _find_resume(decision, directory, stage, fingerprints[stage.id])
    return decision


def _find_resume(decision: ReuseDecision, directory, stage: StagePlan, fingerprint: str) -> None:
    path = directory.checkpoint(stage.id, "last")
    if not os.path.exists(path):
        return
    checkpoint = load_checkpoint(path)
    if checkpoint.get("fingerprint") != fingerprint:
        if stage.id not in decision.changed:
            decision.changed[stage.id] = ("its last.pt has no fingerprint (an older run)" if checkpoint.get("fingerprint") is None
                                          else "its plan changed since it was interrupted")
        return
    if "progress" not in checkpoint:
        raise RunDirectoryError(f"{path} holds no training state", fix="re-run with --force")
    decision.resume_stage, decision.resume_checkpoint, decision.resume_epochs = stage.id, checkpoint, stage.train.epochs
