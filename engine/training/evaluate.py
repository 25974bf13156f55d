"""Evaluation under the stage's precision: accuracy and cross-entropy, and the
stage's own loss on a split (feature-matching stages select on it)."""

from __future__ import annotations

import torch
from torch import nn

from ..components import ModelOutput
from ..distributed import World, all_reduce_sum

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, precision: str = "fp32", world: World = World(),
             prepare=None) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (a fraction) of ``model`` on ``loader``
    (each rank evaluates its shard; the sums are all-reduced)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if prepare is not None:
            images = prepare(images)
        with autocast_context(device, precision):
            logits = model(images)
        totals[0] += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        totals[1] += (logits.argmax(1) == targets).sum()
        totals[2] += images.shape[0]
    loss_sum, correct, seen = all_reduce_sum(world, totals).tolist()  # sync point: once per evaluation
    return loss_sum / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def stage_loss(state, loader, device: torch.device, *, precision: str, world: World = World()) -> float:
    """The mean of the stage's own loss on ``loader`` (``state`` is the
    :class:`~pyramidkd.engine.training.state.StageState`).

    The student runs unwrapped: a DDP forward broadcasts buffers, a collective, and
    the ranks' shards may hold different numbers of batches (a deadlock)."""
    state.student.eval()
    state.loss_fn.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, seen: on the device, no per-batch sync
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        images = state.prepare_images(images)
        with autocast_context(device, precision):
            loss = state.loss_fn(unwrapped_outputs(state.student_tap, images), state.teacher_outputs(images), targets)
        totals[0] += loss.detach().double() * images.shape[0]
        totals[1] += images.shape[0]
    loss_sum, seen = all_reduce_sum(world, totals).tolist()  # sync point: once per evaluation
    return loss_sum / max(seen, 1)


def unwrapped_outputs(tap, images: torch.Tensor) -> ModelOutput:
    """What ``tap(images)`` gives, from the bare model rather than its DDP or
    compiled wrapper (the tap's hooks sit on the bare model's modules)."""
    tap.values = {}
    logits = tap.model(images)
    return ModelOutput(logits, tap.values)


def best_test_acc(history) -> float | None:
    """The best test accuracy over a stage's epoch records (``test_every_epoch``: the
    literature's best-test-epoch figure, :data:`~pyramidkd.engine.records.BEST_TEST_LABEL`); None when not measured."""
    measured = [record.test_acc for record in history if record.test_acc is not None]
    return max(measured) if measured else None
