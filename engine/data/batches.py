"""Batches of a stage: global batches split over ranks for training, shards for
evaluation (:mod:`pyramidkd.engine.distributed`), on either data path:

* :class:`TensorBatches` — the tensor pipeline: a :class:`~pyramidkd.engine.tensordata.TensorSplit`
  gathered by index, augmented and normalised as whole batches on the training device;
* :class:`LoaderBatches` — the ``DataLoader`` pipeline: per-sample datasets and transforms.

Both give the loop the same training interface: ``len`` (steps per epoch),
``set_epoch`` and ``epoch(skip)``, which draws the epoch's order (and, for tensors,
its augmentation) from the stage's generator at once and returns the batches after
the first ``skip`` — so a resumed epoch that resets the generator to the epoch's
start replays the same batches.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterator

import torch

from ..distributed import GlobalBatchSampler, ShardSampler, World, shard_range
from ..tensordata import Augmentation, BatchAugmenter, Normalizer, TensorSplit, draw_augmentation

Batch = tuple[torch.Tensor, torch.Tensor]


def resolve_device(device: torch.device | str, world: World = World()) -> torch.device:
    """``device`` with its index, so that it compares equal to a tensor's ``.device``:
    ``cuda`` -> ``cuda:<local rank>`` under torchrun, else ``cuda:<current device>``."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", world.local_rank if world.distributed else torch.cuda.current_device())


def make_loader(dataset, settings, world: World, device: torch.device, *, train: bool,
                generator: torch.Generator | None = None, augmentation: Augmentation | None = None):
    """``settings`` is the stage's ``TrainSection``; ``generator`` shuffles (training
    only); ``augmentation`` applies to tensor training batches. A ``TensorSplit``
    takes the tensor path unless the stage says ``pipeline = "dataloader"``."""
    if isinstance(dataset, TensorSplit) and settings.pipeline != "dataloader":
        batch_size = settings.batch_size if train else settings.eval_batch_size
        return TensorBatches(dataset, batch_size, world, device, generator=generator if train else None,
                             augmentation=augmentation if train else None)
    workers = settings.num_workers
    options = dict(
        num_workers=workers,
        pin_memory=settings.pin_memory and device.type == "cuda",
        persistent_workers=settings.persistent_workers and workers > 0,
        prefetch_factor=settings.prefetch_factor if workers > 0 else None,
    )
    if train:
        sampler = GlobalBatchSampler(len(dataset), settings.batch_size, generator, world)
        return LoaderBatches(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, generator=generator, **options))
    return torch.utils.data.DataLoader(dataset, batch_size=settings.eval_batch_size, sampler=ShardSampler(len(dataset), world), **options)


class LoaderBatches:
    """A training ``DataLoader`` (over a :class:`GlobalBatchSampler`) behind the loop's interface."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.batch_sampler.set_epoch(epoch)

    def epoch(self, skip: int = 0) -> Iterator[Batch]:
        batches = iter(self.loader)
        # Skip now, not lazily: the skipped samples' per-sample transforms draw from
        # the global RNG, which the caller restores right after this call.
        collections.deque(itertools.islice(batches, skip), maxlen=0)
        return batches

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch()


class TensorBatches:
    """Batches of a :class:`TensorSplit` made with tensor ops.

    Training (``generator`` given): each epoch one permutation, then the crop
    offsets and flips of the whole epoch, both from ``generator``; the global
    batches are those of :class:`GlobalBatchSampler` (each rank takes its
    contiguous share, a tail smaller than the world is dropped). Evaluation: this
    rank's contiguous shard in order, no augmentation. Images held on the CPU
    while training on CUDA are gathered there and each batch is copied over
    (pinned, asynchronously) before it is augmented on the device.
    """

    def __init__(self, split: TensorSplit, batch_size: int, world: World, device: torch.device, *,
                 generator: torch.Generator | None = None, augmentation: Augmentation | None = None):
        self.split, self.batch_size, self.world, self.device = split, batch_size, world, resolve_device(device, world)
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
        return self.generator is not None

    def __len__(self) -> int:
        if self.training:  # as GlobalBatchSampler
            return (len(self.split) + self.batch_size - 1) // self.batch_size
        start, stop = shard_range(len(self.split), self.world)
        return (stop - start + self.batch_size - 1) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        # The order comes from the generator (saved in checkpoints); the number only documents the position.
        self.epoch_number = epoch

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch()

    def epoch(self, skip: int = 0) -> Iterator[Batch]:
        """The epoch's batches after the first ``skip``; the random draws happen now."""
        if not self.training:
            return self._evaluation_batches()
        size = len(self.split)
        order = torch.randperm(size, generator=self.generator)
        offsets = flips = None
        # Host-to-device copies once per epoch (the order, the augmentation), not per batch.
        if self.augmentation is not None:
            offsets, flips = draw_augmentation(size, self.augmentation, self.generator)
            offsets, flips = offsets.to(self.device), flips.to(self.device)
        return self._training_batches(order.to(self.split.images.device), offsets, flips, skip)  # sync point, once an epoch

    def _training_batches(self, order: torch.Tensor, offsets, flips, skip: int) -> Iterator[Batch]:
        size = len(self.split)
        for start in range(skip * self.batch_size, size, self.batch_size):
            stop = min(start + self.batch_size, size)
            if stop - start < self.world.size:  # a tail too small to give every rank a sample
                break
            first, last = shard_range(stop - start, self.world)
            first, last = start + first, start + last
            indices = order[first:last]
            images = self._to_device(self.split.images.index_select(0, indices))
            labels = self._to_device(self.labels.index_select(0, indices))
            if self.augmenter is not None:
                images = self.augmenter(images, offsets[first:last], flips[first:last])
            yield self.normalizer(images), labels

    def _evaluation_batches(self) -> Iterator[Batch]:
        start, stop = shard_range(len(self.split), self.world)
        for first in range(start, stop, self.batch_size):
            last = min(first + self.batch_size, stop)
            images = self._to_device(self.split.images[first:last])
            yield self.normalizer(images), self._to_device(self.labels[first:last])

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch held on the CPU goes over pinned, without blocking the host; one
        already on the device (any GPU tensor: only CPU memory can be pinned) stays."""
        if tensor.device.type == "cpu" and self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)
