"""Everything a stage trains on, built in one place (:func:`build_stage_state`):
the student, its frozen teachers, the loss, the optimiser, the scheduler and the
data order's generator. Where training stands is :class:`~.progress.Progress`;
saving both in ``last`` and restoring them is :mod:`.checkpoints`' work."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import attrs
import torch
from torch import nn

from ..components import Loss, ModelOutput, ModelSource, StageOutput, StagePlan
from ..data.pipeline import split_labels
from ..distributed import sync_batchnorm
from ..errors import RecipeError
from .checkpoints import load_checkpoint
from .models import build_model, inherit_weights, model_from_checkpoint
from .optim import make_optimizer, make_scheduler
from .rng import seed_everything, stage_seed
from .taps import TapRecorder


@attrs.define(eq=False)
class StageState:
    """The models, loss, optimiser and RNG a stage trains with."""

    student: nn.Module
    student_tap: TapRecorder
    teacher_taps: list[TapRecorder]
    loss_fn: Loss
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler, or None
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # the data order; saved with the other RNG states
    channels_last: bool = False
    inherited: list[str] = attrs.field(factory=list)  # tensors copied from init_from
    best_state: dict[str, torch.Tensor] | None = None  # the best epoch's weights (CPU)

    @property
    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_images(images, self.channels_last)

    def teacher_outputs(self, images: torch.Tensor) -> list[ModelOutput]:
        """Frozen teachers under inference mode; their outputs are cloned into
        normal tensors so losses may save them for backward."""
        return teacher_outputs(self.teacher_taps, images)

    def start_batch(self, indices: list[torch.Tensor], device: torch.device) -> None:
        """Give the loss the batch's dataset indices (``indices``: ``[tensor]`` when the
        batches carry them, i.e. the loss has ``needs_indices``; ``[]`` otherwise)."""
        if indices:
            self.loss_fn.start_batch(indices[0].to(device, non_blocking=True))

    @contextlib.contextmanager
    def teachers_in_training_mode(self) -> Iterator[None]:
        """While training, a loss with ``teacher_batch_statistics`` (ofd, as its reference)
        gets teachers whose BatchNorm layers normalise with the batch's statistics:
        train mode with ``track_running_stats`` off, so their running statistics (and
        ``num_batches_tracked``) stay as loaded — nothing for resume to save, and a
        teacher shared with later stages unchanged. Everything else in the teachers
        (dropout) stays in eval mode; on leaving, eval mode again (validation, test)."""
        norms = [m for tap in self.teacher_taps for m in tap.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self.loss_fn.teacher_batch_statistics or not norms:
            yield
            return
        tracked = [m.track_running_stats for m in norms]
        try:
            for module in norms:
                module.train()
                module.track_running_stats = False
            yield
        finally:
            for module, track in zip(norms, tracked):
                module.track_running_stats = track
                module.eval()

    def keep_best(self) -> dict[str, torch.Tensor]:
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.student.state_dict().items()}
        return self.best_state

    def close(self) -> None:
        self.student_tap.close()
        for tap in self.teacher_taps:
            tap.close()


def prepare_images(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def teacher_outputs(taps: list[TapRecorder], images: torch.Tensor) -> list[ModelOutput]:
    if not taps:
        return []
    with torch.inference_mode():
        outputs = [tap(images) for tap in taps]
    return [ModelOutput(o.logits.clone(), {k: v.clone() for k, v in o.features.items()}) for o in outputs]


# --- building ----------------------------------------------------------------


def load_source(run, source: ModelSource) -> tuple[dict, str]:
    """The checkpoint behind a teacher or ``init_from``: an earlier stage's best, or a file."""
    path = run.directory.checkpoint(source.stage_id, "best") if isinstance(source, StageOutput) else source.path
    return load_checkpoint(path), path


def saved_loss_state(run, source: ModelSource) -> dict | None:
    """The loss state an earlier stage of this run saved in its ``last`` checkpoint (``None`` for a file)."""
    if not isinstance(source, StageOutput):
        return None
    path = run.directory.checkpoint(source.stage_id, "last")
    return load_checkpoint(path).get("loss_state") if os.path.exists(path) else None


def load_teacher(run, source: ModelSource, cache: dict) -> nn.Module:
    """A frozen teacher on the run's device; one shared by stages is loaded once."""
    if source not in cache:
        checkpoint, path = load_source(run, source)
        model, _ = model_from_checkpoint(checkpoint, path, run.host)
        model.to(run.device).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        cache[source] = model
    return cache[source]


def build_stage_state(run, stage: StagePlan, teacher_cache: dict) -> StageState:
    """Seed, then build the student (weights inherited from ``init_from``), the
    teachers, the loss, the optimiser and the scheduler — in this order, which
    fixes what the stage's seed gives each of them."""
    device, settings = run.device, stage.train
    seed = stage_seed(run.seed, stage.id)
    seed_everything(seed)
    student = build_model(stage.model, run.data)
    inherited: list[str] = []
    if stage.init_from is not None:
        checkpoint, _ = load_source(run, stage.init_from)
        inherited = inherit_weights(student, checkpoint["state_dict"])
    student = sync_batchnorm(student, run.world, device, settings.sync_batchnorm)  # before the taps hook its modules
    student.to(device)
    if settings.channels_last:
        student.to(memory_format=torch.channels_last)
    teachers = [load_teacher(run, source, teacher_cache) for source in stage.teachers]
    if settings.channels_last:
        for teacher in teachers:
            teacher.to(memory_format=torch.channels_last)
    loss_fn = stage.loss.instantiate().to(device)

    # The loss's shape-dependent parameters exist (setup, on the plain student) and
    # what trains is marked before DDP is built: DDP reduces what requires grad then.
    student_tap = TapRecorder(student, stage.student_taps, role="student", stage_id=stage.id)
    teacher_taps = [TapRecorder(t, stage.teacher_taps, role="teacher", stage_id=stage.id) for t in teachers]
    generator = torch.Generator().manual_seed(seed)
    if type(loss_fn).setup_data is not Loss.setup_data:  # e.g. crd's memory bank, one row per training sample
        loss_fn.setup_data(len(run.data.train), split_labels(run.data.train))
        loss_fn.to(device)
    if type(loss_fn).setup is not Loss.setup:  # shape-dependent loss parameters
        _setup_loss(loss_fn, student_tap, teacher_taps, settings.channels_last, run.data.train, device)
    if stage.init_from is not None and type(loss_fn).inherit_state is not Loss.inherit_state:  # e.g. ft's paraphraser
        loss_fn.inherit_state(saved_loss_state(run, stage.init_from))
    trainable = _trainable_parameters(student, loss_fn, stage)
    student_tap.forward = _student_forward(run, student, loss_fn, settings.compile)
    if settings.compile:
        for tap in teacher_taps:
            tap.forward = torch.compile(tap.model)
    optimizer = make_optimizer(trainable, settings)
    return StageState(
        student=student,
        student_tap=student_tap,
        teacher_taps=teacher_taps,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, settings),
        scaler=torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16"),
        generator=generator,
        channels_last=settings.channels_last,
        inherited=inherited,
    )


class StudentAndLoss(nn.Module):
    """The student and the loss in one module whose forward is the student's: DDP
    wraps it, so the loss's own trainable parameters (a FitNet regressor, a
    connector) are all-reduced with the student's instead of drifting per rank
    (rank 0's copy being the one saved). The loss itself runs outside the DDP
    forward; its gradients reach DDP's hooks in the same backward."""

    def __init__(self, student: nn.Module, loss_fn: Loss):
        super().__init__()
        self.student, self.loss_fn = student, loss_fn

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)


def _student_forward(run, student: nn.Module, loss_fn: Loss, compile_: bool):
    """What the student's tap calls: the plain student, or under torchrun the DDP
    wrapper of student and loss; torch.compile'd over that with ``compile``."""
    forward = student
    if run.world.distributed:
        device = run.device
        wrapped = StudentAndLoss(student, loss_fn)
        local = [f"loss_fn.{name}" for name, _ in loss_fn.named_buffers()
                 if any(name == p or name.startswith(p + ".") for p in loss_fn.rank_local_buffers)]
        if local:  # e.g. CRD's banks (51 MB on CIFAR-100): not re-broadcast on every forward
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapped, local)
        forward = torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward) if compile_ else forward


@torch.no_grad()
def _setup_loss(loss_fn: Loss, student_tap: TapRecorder, teacher_taps: list[TapRecorder], channels_last: bool, dataset,
                device: torch.device) -> None:
    images = torch.stack([dataset[i][0] for i in range(min(2, len(dataset)))]).to(device)
    images = prepare_images(images, channels_last)
    student_tap.model.eval()
    loss_fn.setup(student_tap(images), teacher_outputs(teacher_taps, images))
    loss_fn.to(device)


def _trainable_parameters(student: nn.Module, loss_fn: Loss, stage: StagePlan) -> list[torch.nn.Parameter]:
    """The student's parameters under the stage's trainable prefixes (all if none),
    plus the loss's own; the others are frozen."""
    trainable = []
    for name, parameter in student.named_parameters():
        wanted = stage.trainable is None or any(name == p or name.startswith(p + ".") for p in stage.trainable)
        parameter.requires_grad_(wanted)
        if wanted:
            trainable.append(parameter)
    trainable += [p for p in loss_fn.parameters() if p.requires_grad]
    if not trainable:
        raise RecipeError(f"stage {stage.id!r} has no trainable parameters", fix="check the scheme's trainable layers")
    return trainable

