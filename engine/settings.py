"""The host's own recipe sections: ``[experiment]`` and ``[train]``.

Plain attrs classes, validated like any component's ``Params``. They live apart
from the recipe loader (:mod:`~pyramidkd.engine.recipe`, which structures them
from the TOML data) so that what only needs the settings — the public
:class:`~pyramidkd.engine.components.StagePlan`, whose ``train`` is a
``TrainSection``, and the training runtime — does not depend on reading a file.
"""

from __future__ import annotations

from typing import Literal

import attrs

from .validation import FieldValueError, between, increasing_epochs, non_negative, positive


@attrs.define
class ExperimentSection:
    name: str = attrs.field(default="experiment", metadata={"help": "used for the default output folder"})
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    plugins: list[str] = attrs.field(factory=list, metadata={"help": "local plugin modules to load"})
    threads: int = attrs.field(default=0, validator=non_negative, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    deterministic: bool = attrs.field(default=True, metadata={
        "help": "true: deterministic algorithms, no cuDNN autotuning (same seed, same run; exact resume); "
                "false: cuDNN autotuning and TF32 matmuls, faster on GPUs but not bit-reproducible"})
    description: str = ""


@attrs.define
class OptimizerSection:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = attrs.field(default=0.05, validator=positive, metadata={"help": "learning rate, e.g. 0.05 for SGD, 1e-3 for Adam"})
    momentum: float = attrs.field(default=0.9, validator=between(0.0, 1.0))
    weight_decay: float = attrs.field(default=5e-4, validator=non_negative)
    nesterov: bool = False


@attrs.define
class SchedulerSection:
    name: Literal["none", "cosine", "step", "multistep", "plateau"] = "cosine"
    step_size: int = attrs.field(default=30, validator=positive, metadata={"help": "epochs between decays (step)"})
    gamma: float = attrs.field(default=0.1, validator=positive)
    factor: float = attrs.field(default=0.1, validator=between(0.0, 1.0), metadata={"help": "plateau decay factor"})
    patience: int = attrs.field(default=5, validator=non_negative)
    min_lr: float = attrs.field(default=0.0, validator=non_negative)
    milestones: list[int] = attrs.field(factory=list, validator=increasing_epochs, metadata={
        "help": "epochs after which the learning rate is multiplied by gamma (multistep), e.g. [150, 180, 210]"})

    def __attrs_post_init__(self):
        if self.name == "multistep" and not self.milestones:
            raise FieldValueError('name = "multistep" needs milestones',
                                  "add milestones = [150, 180, 210] (epochs after which the rate drops by gamma)")


@attrs.define
class TrainSection:
    """One stage's training settings: ``[train]``, then ``[stages.train]`` over it."""

    epochs: int = attrs.field(default=10, validator=positive, metadata={"help": "number of epochs, e.g. 10"})
    batch_size: int = attrs.field(default=64, validator=positive, metadata={"help": "e.g. 64"})
    eval_batch_size: int = attrs.field(default=256, validator=positive)
    num_workers: int = attrs.field(default=0, validator=non_negative)
    pipeline: Literal["auto", "tensor", "dataloader"] = attrs.field(default="auto", metadata={
        "help": "how batches are made: tensor (the data set held as tensors, batches augmented with tensor ops on the "
                "training device), dataloader (per-sample transforms in a DataLoader), auto (tensor when the data set "
                "offers it and it takes at most 25 % of the free RAM); one choice for every stage of a run"})
    grad_clip: float = attrs.field(default=0.0, validator=non_negative, metadata={"help": "max gradient norm; 0 = off"})
    on_nan: Literal["stop", "skip-batch"] = attrs.field(default="stop", metadata={"help": "what a non-finite loss does"})
    precision: Literal["fp32", "bf16", "fp16"] = attrs.field(default="fp32", metadata={"help": "autocast precision (fp16 uses a GradScaler)"})
    channels_last: bool = False
    compile: bool = attrs.field(default=False, metadata={"help": "torch.compile the student and teacher forward"})
    # Default true: under torchrun a BN model then normalises over the global batch,
    # as the single-process run does (the contract: same recipe, same result), at the
    # cost of one all-reduce per BN layer per step; no effect in one process.
    sync_batchnorm: bool = attrs.field(default=True, metadata={
        "help": "under torchrun on GPUs, SyncBatchNorm: BatchNorm statistics over the global batch, as in one process "
                "(false: each rank's own share, faster, not the single-process result); PyTorch has no SyncBatchNorm "
                "on CPUs (gloo), where ranks keep their own statistics (one warning)"})
    test_every_epoch: bool = attrs.field(default=False, metadata={
        "help": "also test every epoch's model (one test pass per epoch) and report the best test epoch, the "
                "literature's optimistic protocol, beside the checkpoint chosen on validation; off: no test pass until the end"})
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = attrs.field(default=2, validator=positive, metadata={"help": "batches each worker loads ahead"})
    optimizer: OptimizerSection = attrs.field(factory=OptimizerSection)
    scheduler: SchedulerSection = attrs.field(factory=SchedulerSection)
