"""The batches a stage iterates, on either pipeline, cut as the stage's
:class:`~.plan.BatchPlan` says (global batches split over ranks for training, a
shard per rank for evaluation):

* :class:`TensorBatches` — the tensor pipeline: a :class:`~.splits.TensorSplit`
  gathered by index, augmented and normalised as whole batches on the training device;
* :class:`LoaderBatches` — the ``DataLoader`` pipeline: per-sample datasets and
  transforms, indices from a :class:`PlanSampler`.

Both give the loop the same training interface: ``plan``, ``len`` (steps per epoch),
``set_epoch`` and ``epoch(skip)``, which draws the epoch's order (and, for tensors,
its augmentation) from the stage's generator at once and returns the batches after
the first ``skip`` — so a resumed epoch that resets the generator to the epoch's
start replays the same batches.

Made with ``indices=True`` (the loop asks when its loss has ``needs_indices``), the
training batches are ``(images, targets, indices)``: each sample's position in the
training split (int64), the same on both pipelines for the same generator; without
it they are ``(images, targets)`` and nothing extra is gathered.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterator

import torch

from ..distributed import World, resolve_device
from .augmentation import Augmentation, BatchAugmenter, draw_augmentation
from .plan import BatchPlan
from .splits import Normalizer, TensorSplit

Batch = tuple[torch.Tensor, torch.Tensor]


def make_loader(dataset, settings, world: World, device: torch.device, *, train: bool,
                generator: torch.Generator | None = None, augmentation: Augmentation | None = None,
                indices: bool = False):
    """``settings`` is the stage's ``TrainSection``; ``generator`` shuffles (training
    only); ``augmentation`` applies to tensor training batches; ``indices``: training
    batches end with the samples' indices. A ``TensorSplit`` takes the tensor
    pipeline unless the stage says ``pipeline = "dataloader"``."""
    batch_size = settings.batch_size if train else settings.eval_batch_size
    if isinstance(dataset, TensorSplit) and settings.pipeline != "dataloader":
        return TensorBatches(dataset, batch_size, world, device, generator=generator if train else None,
                             augmentation=augmentation if train else None, indices=train and indices)
    workers = settings.num_workers
    options = dict(
        num_workers=workers,
        pin_memory=settings.pin_memory and device.type == "cuda",
        persistent_workers=settings.persistent_workers and workers > 0,
        prefetch_factor=settings.prefetch_factor if workers > 0 else None,
    )
    if train:
        sampler = GlobalBatchSampler(len(dataset), batch_size, generator, world)
        return LoaderBatches(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, generator=generator, **options),
                             indices=indices)
    sampler = PlanSampler(BatchPlan(len(dataset), batch_size, world))
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **options)


class PlanSampler(torch.utils.data.Sampler):
    """A ``DataLoader`` batch sampler: this rank's indices of every batch of ``plan``
    (training: of the epoch's order, drawn from ``generator`` when iteration starts)."""

    def __init__(self, plan: BatchPlan, generator: torch.Generator | None = None):
        self.plan, self.generator = plan, generator
        self.epoch = 0
        self.drawn: collections.deque[list[int]] | None = None  # LoaderBatches(indices=True): batches handed out

    def set_epoch(self, epoch: int) -> None:
        # The order comes from the stage's generator (saved in checkpoints),
        # so the epoch number only documents the position.
        self.epoch = epoch

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = self.plan.epoch_order(self.generator)
        indices = order.tolist() if order is not None else range(self.plan.size)
        for first, last in self.plan.rank_slices():
            batch = list(indices[first:last])
            if self.drawn is not None:
                self.drawn.append(batch)
            yield batch


class GlobalBatchSampler(PlanSampler):
    """The training sampler: shuffled global batches, each split across ranks.

    Like ``DistributedSampler`` it shards every epoch's data over the ranks and has
    ``set_epoch``; unlike it, the global batches are those of a single-process run
    with the same seed, and nothing is padded (see :class:`~.plan.BatchPlan`)."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator, world: World):
        super().__init__(BatchPlan(size, batch_size, world, shuffle=True), generator)


class LoaderBatches:
    """A training ``DataLoader`` (over a :class:`GlobalBatchSampler`) behind the loop's interface.

    ``indices``: the sampler records each batch of indices it hands out and the
    batches, which a ``DataLoader`` returns in the sampler's order (workers and
    prefetching included), take them in that order."""

    def __init__(self, loader: torch.utils.data.DataLoader, *, indices: bool = False):
        self.loader = loader
        self.plan: BatchPlan = loader.batch_sampler.plan
        self.indices = indices

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.loader.batch_sampler.set_epoch(epoch)

    def epoch(self, skip: int = 0) -> Iterator[Batch]:
        sampler = self.loader.batch_sampler
        sampler.drawn = collections.deque() if self.indices else None
        batches = iter(self.loader)
        # Skip now, not lazily: the skipped samples' per-sample transforms draw from
        # the global RNG, which the caller restores right after this call.
        collections.deque(itertools.islice(batches, skip), maxlen=0)
        if not self.indices:
            return batches
        for _ in range(skip):
            sampler.drawn.popleft()
        return self._with_indices(batches, sampler.drawn)

    @staticmethod
    def _with_indices(batches, drawn: collections.deque) -> Iterator[tuple[torch.Tensor, ...]]:
        for images, targets in batches:
            yield images, targets, torch.tensor(drawn.popleft(), dtype=torch.long)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch()


class TensorBatches:
    """Batches of a :class:`~.splits.TensorSplit` made with tensor ops.

    Training (``generator`` given): each epoch the plan's order, then the crop
    offsets and flips of the whole epoch, all from ``generator``; each rank takes
    its share of the plan's global batches, as the ``DataLoader`` pipeline's
    :class:`GlobalBatchSampler` does. Evaluation: this rank's shard in order, no
    augmentation. Images held on the CPU while training on CUDA are gathered there
    and each batch is copied over (pinned, asynchronously) before it is augmented
    on the device.
    """

    def __init__(self, split: TensorSplit, batch_size: int, world: World, device: torch.device, *,
                 generator: torch.Generator | None = None, augmentation: Augmentation | None = None,
                 indices: bool = False):
        self.split, self.device = split, resolve_device(device, world)
        self.indices = indices
        self.plan = BatchPlan(len(split), batch_size, world, shuffle=generator is not None)
        self.generator = generator
        self.augmentation = augmentation if generator is not None and augmentation is not None and augmentation.active else None
        self.normalizer = Normalizer(split.mean, split.std, self.device)
        _, _, height, width = split.images.shape
        padding = self.augmentation.crop_padding if self.augmentation else 0
        self.augmenter = BatchAugmenter(height, width, padding, self.device) if self.augmentation else None
        # Labels live with the images, so a batch gathers both with one index where the
        # data is and copies both over together (no per-batch blocking index copy).
        self.labels = split.labels.to(split.images.device)
        self.epoch_number = 0

    @property
    def training(self) -> bool:
        return self.plan.shuffle

    def __len__(self) -> int:
        return self.plan.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        # The order comes from the generator (saved in checkpoints); the number only documents the position.
        self.epoch_number = epoch

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch()

    def epoch(self, skip: int = 0) -> Iterator[Batch]:
        """The epoch's batches after the first ``skip``; the random draws happen now."""
        if not self.training:
            return self._evaluation_batches()
        order = self.plan.epoch_order(self.generator)
        offsets = flips = None
        # Host-to-device copies once per epoch (the order, the augmentation), not per batch.
        if self.augmentation is not None:
            offsets, flips = draw_augmentation(len(self.split), self.augmentation, self.generator)
            offsets, flips = offsets.to(self.device), flips.to(self.device)
        return self._training_batches(order.to(self.split.images.device), offsets, flips, skip)  # sync point, once an epoch

    def _training_batches(self, order: torch.Tensor, offsets, flips, skip: int) -> Iterator[Batch]:
        for first, last in self.plan.rank_slices(skip):
            indices = order[first:last]
            images = self._to_device(self.split.images.index_select(0, indices))
            labels = self._to_device(self.labels.index_select(0, indices))
            if self.augmenter is not None:
                images = self.augmenter(images, offsets[first:last], flips[first:last])
            if self.indices:
                yield self.normalizer(images), labels, self._to_device(indices)
            else:
                yield self.normalizer(images), labels

    def _evaluation_batches(self) -> Iterator[Batch]:
        for first, last in self.plan.rank_slices():
            images = self._to_device(self.split.images[first:last])
            yield self.normalizer(images), self._to_device(self.labels[first:last])

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch held on the CPU goes over pinned, without blocking the host; one
        already on the device (any GPU tensor: only CPU memory can be pinned) stays."""
        if tensor.device.type == "cpu" and self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)
