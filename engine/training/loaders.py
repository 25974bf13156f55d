"""Data loaders of a stage: global batches split over ranks for training, shards
for evaluation (:mod:`pyramidkd.engine.distributed`)."""

from __future__ import annotations

import torch

from ..distributed import GlobalBatchSampler, ShardSampler, World


def make_loader(dataset, settings, world: World, device: torch.device, *, train: bool,
                generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """``settings`` is the stage's ``TrainSection``; ``generator`` shuffles (training only)."""
    workers = settings.num_workers
    options = dict(
        num_workers=workers,
        pin_memory=settings.pin_memory and device.type == "cuda",
        persistent_workers=settings.persistent_workers and workers > 0,
        prefetch_factor=settings.prefetch_factor if workers > 0 else None,
    )
    if train:
        sampler = GlobalBatchSampler(len(dataset), settings.batch_size, generator, world)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, generator=generator, **options)
    return torch.utils.data.DataLoader(dataset, batch_size=settings.eval_batch_size, sampler=ShardSampler(len(dataset), world), **options)
