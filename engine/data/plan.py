"""Batch geometry, written once: :class:`BatchPlan`.

``train.batch_size`` is the *global* batch, under torchrun as in one process. Every
epoch draws one permutation of the training split from the stage's generator; the
global batches are its consecutive runs of ``batch_size`` samples (the last one
shorter), each split across the ranks in contiguous shares whose sizes differ by at
most one, so the global batches are those of a single-process run with the same
seed. Evaluation takes this rank's contiguous shard of a split, in order.

The ``DataLoader`` samplers and the tensor batches (:mod:`.batches`), the DDP
shares and the optimiser step's loss weight (:mod:`pyramidkd.engine.training.loop`)
all ask the plan, so the two pipelines cut the same batches.
"""

from __future__ import annotations

from typing import Iterator

import attrs
import torch

from ..distributed import World


@attrs.frozen
class BatchPlan:
    """How one split is cut into batches on this rank.

    Training (``shuffle``): shuffled global batches of ``batch_size``, each rank
    taking its share. The short-tail rule: a global batch smaller than the world
    (possible only under torchrun) is dropped, since some rank would get no sample;
    nothing else is dropped or padded. Evaluation: this rank's shard of the split in
    batches of ``batch_size``, in order.
    """

    size: int  # samples in the split
    batch_size: int  # training: the global batch; evaluation: this rank's batch
    world: World = World()
    shuffle: bool = False  # training: a new order every epoch, global batches shared by the ranks

    @property
    def steps_per_epoch(self) -> int:
        """Training: the global batches of an epoch (a short tail counts, dropped or
        not, as ``len`` of a ``DataLoader``); evaluation: this rank's batches."""
        if self.shuffle:
            return _ceil_div(self.size, self.batch_size)
        start, stop = shard_range(self.size, self.world)
        return _ceil_div(stop - start, self.batch_size)

    def epoch_order(self, generator: torch.Generator | None) -> torch.Tensor | None:
        """The epoch's sample order (training: one permutation from ``generator``, the
        stage's, saved in checkpoints); ``None`` for evaluation, which keeps the split's order."""
        return torch.randperm(self.size, generator=generator) if self.shuffle else None

    def global_batch_size(self, step: int) -> int:
        """Samples of training step ``step`` (from 1) over all ranks."""
        return min(self.batch_size, self.size - (step - 1) * self.batch_size)

    def keeps(self, global_size: int) -> bool:
        """The short-tail rule: every rank must get at least one sample of a global batch."""
        return global_size >= self.world.size

    def rank_slices(self, skip: int = 0) -> Iterator[tuple[int, int]]:
        """This rank's ``[first, last)`` of every batch after the first ``skip``:
        positions in :meth:`epoch_order` (training) or in the split (evaluation)."""
        if not self.shuffle:
            start, stop = shard_range(self.size, self.world)
            for first in range(start + skip * self.batch_size, stop, self.batch_size):
                yield first, min(first + self.batch_size, stop)
            return
        for start in range(skip * self.batch_size, self.size, self.batch_size):
            stop = min(start + self.batch_size, self.size)
            if not self.keeps(stop - start):
                break
            first, last = shard_range(stop - start, self.world)
            yield start + first, start + last

    def loss_weight(self, step: int, local_batch: int) -> float:
        """The factor on this rank's mean loss at training step ``step``: its share of
        the global batch times the world size, so that DDP's average of the ranks'
        gradients equals the single-process gradient (1 in one process)."""
        if not self.world.distributed:
            return 1.0
        return local_batch * self.world.size / self.global_batch_size(step)


def shard_range(count: int, world: World) -> tuple[int, int]:
    """This rank's contiguous part ``[start, stop)`` of ``count`` items (sizes differ by at most one)."""
    base, extra = divmod(count, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (1 if world.rank < extra else 0)


def _ceil_div(count: int, size: int) -> int:
    return (count + size - 1) // size
