"""Data-parallel training on PyTorch's own runtime (torchrun + DistributedDataParallel).

The same recipe runs unchanged under ``torchrun --nproc_per_node=N -m pyramidkd run``:
``train.batch_size`` stays the *global* batch. Each global batch is drawn exactly
as in a single-process run (one permutation per epoch from the stage's seeded
generator) and split across ranks, on either pipeline, as
:class:`~pyramidkd.engine.data.plan.BatchPlan` says; every rank's loss is weighted
by its share of the batch (the same plan), so the averaged gradient equals the
single-process one up to float summation order.

Two things make that hold beyond the plain student: every trainable parameter of
the loss (a FitNet regressor, a connector) is reduced with the student's (the DDP
module holds both, :mod:`~pyramidkd.engine.training.state`), and BatchNorm layers
normalise over the global batch with ``train.sync_batchnorm`` (SyncBatchNorm,
CUDA only in PyTorch: on CPUs each rank keeps its own statistics).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os

import attrs
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("pyramidkd")


@attrs.define(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(use_cuda: bool) -> World:
    """Join the process group torchrun describes in the environment (if any)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        # The group this process joined is left when it ends (NCCL warns, and may
        # hang on exit, when a process ends with its group still alive).
        atexit.register(close_world)
    return World(rank, size, local_rank)


def close_world() -> None:
    """Leave the process group (``destroy_process_group``); safe to call twice."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if not world.distributed:
        return
    if dist.get_backend() == "nccl":
        # NCCL's barrier needs the rank's device; without it, it guesses one from
        # the rank (a warning, and a hang where that guess is wrong).
        dist.barrier(device_ids=[world.local_rank])
    else:
        dist.barrier()


def all_reduce_sum(world: World, values: torch.Tensor) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(world: World, values: torch.Tensor) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def all_gather_tensors(world: World, value: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``value`` (same shape and dtype on each), on the CPU, in rank order.
    A collective: every rank must call it at the same point."""
    if not world.distributed:
        return [value]
    device = torch.device("cuda", world.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = value.to(device)
    parts = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(parts, local)
    return [part.cpu() for part in parts]  # sync point: a few bytes per rank, at a save only


def broadcast_object(world: World, value):
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_batchnorm(model: nn.Module, world: World, device: torch.device, enabled: bool) -> nn.Module:
    """``model`` with its BatchNorm layers as ``SyncBatchNorm`` (statistics over the
    global batch, as in one process) under torchrun on CUDA with ``train.sync_batchnorm``.
    PyTorch has SyncBatchNorm on GPUs only: on CPUs (gloo) the model is kept, with
    one warning per process that BN statistics stay per rank."""
    if not (enabled and world.distributed and has_batchnorm(model)):
        return model
    if device.type != "cuda":
        if world.is_main and not _warned:
            _warned.append(True)
            log.warning(f"train.sync_batchnorm = true, but PyTorch's SyncBatchNorm needs CUDA: on this {device.type} run "
                        "(gloo) each rank normalises with its own share of the batch, so a BatchNorm model does not match "
                        "the single-process run; set sync_batchnorm = false to accept that without this warning")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


_warned: list[bool] = []  # the CPU warning above, once per process


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def resolve_device(device: torch.device | str, world: World = World()) -> torch.device:
    """``device`` with its index, so that it compares equal to a tensor's ``.device``:
    ``cuda`` -> ``cuda:<local rank>`` under torchrun, else ``cuda:<current device>``."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", world.local_rank if world.distributed else torch.cuda.current_device())
