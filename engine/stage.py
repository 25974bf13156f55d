"""One training stage: the loop every scheme's stages share, resumable to the step.

A ``last`` checkpoint (written atomically at the end of every epoch, and mid-epoch
when a run is interrupted) holds the model, optimiser, scheduler, loss-module state,
the position (epoch, step), the best-so-far metric, the stage's metrics history and
every RNG state (python, numpy, torch CPU and CUDA, the data-loader generator), so a
resumed stage continues exactly as if it had never stopped.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import signal
import time
import zlib

import attrs
import numpy as np
import torch
from torch import nn

from .distributed import GlobalBatchSampler, ShardSampler, World, all_reduce_max, all_reduce_sum
from .components import ComponentSpec, DataSplits, Loss, ModelOutput, ModelSource, StageOutput, StagePlan
from .errors import CheckpointError, RecipeError, UserError
from .recipe import TrainSection
from .rundir import load_checkpoint, save_checkpoint
from .validation import Structurer


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss became NaN)."""


class RunInterrupted(UserError):
    """SIGINT/SIGTERM: the state was saved; the message says how to resume."""

    def __init__(self, message: str, *, signum: int, fix: str):
        super().__init__(message, fix=fix)
        self.exit_code = 128 + signum


class StopFlag:
    """Set by the SIGINT/SIGTERM handlers; checked after every optimisation step."""

    def __init__(self):
        self.signum: int | None = None

    def request(self, signum, frame=None):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_seed(seed: int, stage_id: str) -> int:
    # Depends on the stage id, not its position, so re-running or skipping
    # earlier stages leaves a stage's randomness unchanged.
    return zlib.crc32(f"{seed}:{stage_id}".encode()) & 0x7FFFFFFF


def rng_states(generator: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loader": generator.get_state(),
    }


def restore_rng_states(states: dict, generator: torch.Generator | None) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None:
        generator.set_state(states["loader"])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TapRecorder:
    """Runs a model and records the tensors at its tap points (forward hooks)."""

    def __init__(self, model: nn.Module, taps: dict[str, str], *, role: str, stage_id: str, forward=None):
        self.model = model
        self.forward = forward if forward is not None else model  # a DDP- or torch.compile-wrapped model
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for tap_name, spec in taps.items():
            path, _, part = spec.partition(":")
            if path not in modules:
                raise RecipeError(
                    f"stage {stage_id!r}: the {role} has no module {path!r} to tap",
                    fix="the scheme and model disagree; check the model names and levels",
                )
            self.handles.append(modules[path].register_forward_hook(self._hook(tap_name, part == "input")))

    def _hook(self, name: str, want_input: bool):
        def record(module, inputs, output):
            self.values[name] = inputs[0] if want_input else output

        return record

    def __call__(self, images: torch.Tensor) -> ModelOutput:
        self.values = {}
        logits = self.forward(images)
        return ModelOutput(logits, self.values)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def build_model(spec: ComponentSpec, data: DataSplits) -> nn.Module:
    return spec.instantiate().build(data.num_classes, tuple(data.input_shape))


def model_from_checkpoint(checkpoint: dict, path: str, host) -> tuple[nn.Module, dict]:
    description = checkpoint.get("model") or {}
    name = description.get("name")
    try:
        cls = host.registry("model").get(name)
    except RecipeError as error:
        raise CheckpointError(f"the checkpoint's model {name!r} is not available: {error.message}", file=path, fix=error.fix) from None
    params = Structurer(path).structure(cls.Params, description.get("params", {}), "model")
    model = cls(params).build(description["num_classes"], tuple(description["input_shape"]))
    load_state(model, checkpoint["state_dict"], path)
    return model, description


def load_state(model: nn.Module, state: dict, path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (file vs model)", mismatched)):
            if keys:
                details.append(f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        raise CheckpointError(
            "the checkpoint does not fit this model architecture; " + "; ".join(details),
            file=path,
            fix="use a checkpoint of the same model with the same width, image size and classes",
        )
    model.load_state_dict(state)


def inherit_weights(student: nn.Module, source_state: dict) -> list[str]:
    """Copy every tensor the student shares with the source (same name and shape)."""
    own = student.state_dict()
    shared = {k: v for k, v in source_state.items() if k in own and own[k].shape == v.shape}
    student.load_state_dict(shared, strict=False)
    return sorted(shared)


def make_optimizer(parameters, train: TrainSection) -> torch.optim.Optimizer:
    opt = train.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(parameters, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=opt.nesterov and opt.momentum > 0)
    if opt.name == "adam":
        return torch.optim.Adam(parameters, lr=opt.lr, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(parameters, lr=opt.lr, weight_decay=opt.weight_decay)


def make_scheduler(optimizer, train: TrainSection):
    sched = train.scheduler
    if sched.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.epochs, eta_min=sched.min_lr)
    if sched.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=sched.step_size, gamma=sched.gamma)
    if sched.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=sched.factor, patience=sched.patience, min_lr=sched.min_lr)
    return None


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, world: World = World(), prepare=None) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (a fraction) of ``model`` on ``loader``
    (each rank evaluates its shard; the sums are all-reduced)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if prepare is not None:
            images = prepare(images)
        with autocast_context(device, getattr(loader, "precision", "fp32")):
            logits = model(images)
        totals[0] += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        totals[1] += (logits.argmax(1) == targets).sum()
        totals[2] += images.shape[0]
    loss_sum, correct, seen = all_reduce_sum(world, totals).tolist()
    return loss_sum / max(seen, 1), correct / max(seen, 1)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


@attrs.define
class Progress:
    """Where a stage stands; saved in ``last`` and restored on resume."""

    epoch: int = 0  # last epoch completely done
    step: int = 0  # steps done in epoch+1 (mid-epoch save), 0 at an epoch boundary
    best_score: float = -math.inf
    best_epoch: int = 0
    best_val_acc: float = 0.0
    history: list = attrs.field(factory=list)  # this stage's epoch records
    skipped_batches: int = 0
    # mid-epoch only: running sums and the loader state the epoch started from
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    epoch_loader_state: torch.Tensor | None = None


class StageRunner:
    """Trains one stage (``run`` is the :class:`~pyramidkd.engine.runner.Run`)."""

    def __init__(self, run, stage: StagePlan, teacher_cache: dict, stop: StopFlag | None = None):
        self.run = run
        self.stage = stage
        self.device = run.device
        self.teacher_cache = teacher_cache
        self.stop = stop or StopFlag()

    # -- models ------------------------------------------------------------
    def source_checkpoint(self, source: ModelSource) -> tuple[dict, str]:
        path = self.run.directory.checkpoint(source.stage_id, "best") if isinstance(source, StageOutput) else source.path
        return load_checkpoint(path), path

    def teacher(self, source: ModelSource) -> nn.Module:
        if source not in self.teacher_cache:  # a teacher shared by stages is loaded once
            checkpoint, path = self.source_checkpoint(source)
            model, _ = model_from_checkpoint(checkpoint, path, self.run.host)
            model.to(self.device).eval()
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            self.teacher_cache[source] = model
        model = self.teacher_cache[source]
        if self.stage.train.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def loader(self, dataset, *, train: bool, generator: torch.Generator | None = None):
        settings, world = self.stage.train, self.run.world
        workers = settings.num_workers
        options = dict(
            num_workers=workers,
            pin_memory=settings.pin_memory and self.device.type == "cuda",
            persistent_workers=settings.persistent_workers and workers > 0,
            prefetch_factor=settings.prefetch_factor if workers > 0 else None,
        )
        if train:
            sampler = GlobalBatchSampler(len(dataset), settings.batch_size, generator, world)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, generator=generator, **options)
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_size=settings.eval_batch_size, sampler=ShardSampler(len(dataset), world), **options)
        loader.precision = settings.precision
        return loader

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.stage.train.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    # -- the stage -----------------------------------------------------------
    def execute(self, resume_checkpoint: dict | None = None) -> dict:
        progress = self.setup(resume_checkpoint)
        self.run.call("pyramidkd_stage_start", stage=self.stage)
        try:
            self.train(progress)
        finally:
            self.close()
        return self.finish(progress)

    def close(self) -> None:
        self.student_tap.close()
        for tap in self.teacher_taps:
            tap.close()

    def setup(self, resume_checkpoint: dict | None = None) -> Progress:
        """Build the student, teachers, loss, optimiser and scheduler (restoring
        them from ``resume_checkpoint`` if given); return where training stands."""
        run, stage = self.run, self.stage
        started = time.time()
        seed = stage_seed(run.seed, stage.id)
        seed_everything(seed)
        student = build_model(stage.model, run.data)
        self.inherited: list[str] = []
        if stage.init_from is not None:
            checkpoint, _ = self.source_checkpoint(stage.init_from)
            self.inherited = inherit_weights(student, checkpoint["state_dict"])
        student.to(self.device)
        if stage.train.channels_last:
            student.to(memory_format=torch.channels_last)
        teachers = [self.teacher(source) for source in stage.teachers]
        loss_fn = stage.loss.instantiate().to(self.device)

        forward = student
        if run.world.distributed:
            forward = torch.nn.parallel.DistributedDataParallel(student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        teacher_forwards = list(teachers)
        if stage.train.compile:
            forward = torch.compile(forward)
            teacher_forwards = [torch.compile(t) for t in teachers]
        self.student_tap = TapRecorder(student, stage.student_taps, role="student", stage_id=stage.id, forward=forward)
        self.teacher_taps = [TapRecorder(t, stage.teacher_taps, role="teacher", stage_id=stage.id, forward=f)
                             for t, f in zip(teachers, teacher_forwards)]
        self.generator = torch.Generator().manual_seed(seed)
        if type(loss_fn).setup is not Loss.setup:  # shape-dependent loss parameters
            self.setup_loss(loss_fn, run.data.train)

        trainable = []
        for name, parameter in student.named_parameters():
            wanted = stage.trainable is None or any(name == p or name.startswith(p + ".") for p in stage.trainable)
            parameter.requires_grad_(wanted)
            if wanted:
                trainable.append(parameter)
        trainable += [p for p in loss_fn.parameters() if p.requires_grad]
        if not trainable:
            raise RecipeError(f"stage {stage.id!r} has no trainable parameters", fix="check the scheme's trainable layers")
        self.student, self.loss_fn = student, loss_fn
        self.optimizer = make_optimizer(trainable, stage.train)
        self.scheduler = make_scheduler(self.optimizer, stage.train)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=stage.train.precision == "fp16")
        self.best_state = None
        progress = Progress()
        if resume_checkpoint is not None:
            progress = self.restore(resume_checkpoint)
        elapsed_before = resume_checkpoint.get("elapsed_s", 0.0) if resume_checkpoint else 0.0
        self.started = started - elapsed_before
        return progress

    def train(self, progress: Progress) -> None:
        run, stage = self.run, self.stage
        train_loader = self.loader(run.data.train, train=True, generator=self.generator)
        val_loader = self.loader(run.data.val, train=False)
        for epoch in range(progress.epoch + 1, stage.train.epochs + 1):
            epoch_started = time.time()
            train_loss, train_acc = self.train_epoch(epoch, train_loader, progress)
            train_time = time.time() - epoch_started
            val_loss, val_acc = evaluate(self.student, val_loader, self.device, run.world, self.prepare_images)
            stage_val_loss = self.stage_loss(val_loader) if stage.select == "val_loss" else None
            score = {"val_acc": val_acc, "val_loss": -(stage_val_loss or 0.0), "last": float(epoch)}[stage.select]
            lr = self.optimizer.param_groups[0]["lr"]
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(val_acc)
            elif self.scheduler is not None:
                self.scheduler.step()
            if score > progress.best_score:
                progress.best_score, progress.best_epoch, progress.best_val_acc = score, epoch, val_acc
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.student.state_dict().items()}
                if run.world.is_main:
                    save_checkpoint(run.directory.checkpoint(stage.id, "best"), self.model_checkpoint(self.best_state, epoch, val_acc))
            record = {
                "kind": "epoch",
                "stage": stage.id,
                "entry": stage.entry_id,
                "epoch": epoch,
                "epochs": stage.train.epochs,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "stage_val_loss": stage_val_loss,
                "best_val_acc": progress.best_val_acc,
                "best_epoch": progress.best_epoch,
                "lr": lr,
                "skipped_batches": progress.skipped_batches,
                "train_time_s": round(train_time, 4),
                "epoch_time_s": round(time.time() - epoch_started, 4),
            }
            progress.history.append(record)
            progress.epoch, progress.step, progress.skipped_batches = epoch, 0, 0
            progress.loss_sum, progress.correct, progress.seen, progress.epoch_loader_state = 0.0, 0, 0, None
            # `last` first, then the hooks: a crash after this point loses nothing.
            self.save_last(progress)
            run.call("pyramidkd_epoch_end", stage=stage, epoch=epoch, metrics=record)
            run.call("pyramidkd_metrics", stage=stage, record=record)

    def train_epoch(self, epoch: int, loader, progress: Progress) -> tuple[float, float]:
        run, stage, world = self.run, self.stage, self.run.world
        student, loss_fn, optimizer, scaler = self.student, self.loss_fn, self.optimizer, self.scaler
        student.train()
        loss_fn.train()
        loader.batch_sampler.set_epoch(epoch)
        resumed_mid_epoch = progress.step > 0
        if resumed_mid_epoch:  # replay the same shuffle, then skip the batches already done
            saved_rng = rng_states(self.generator)
            self.generator.set_state(progress.epoch_loader_state)
        else:
            progress.epoch_loader_state = self.generator.get_state()
        batches = iter(loader)
        if resumed_mid_epoch:
            batches = itertools.islice(batches, progress.step, None)
            restore_rng_states(saved_rng, None)  # global RNGs as they were when interrupted
        # loss sum, correct, seen: kept on the device, synchronised once per epoch
        totals = torch.tensor([progress.loss_sum, progress.correct, progress.seen], dtype=torch.float64, device=self.device)
        dataset_size, batch_size = len(run.data.train), stage.train.batch_size
        num_steps = len(loader)
        clip = stage.train.grad_clip
        trained_parameters = [p for g in optimizer.param_groups for p in g["params"]]
        for step, (images, targets) in enumerate(batches, start=progress.step + 1):
            images = self.prepare_images(images.to(self.device, non_blocking=True))
            targets = targets.to(self.device, non_blocking=True)
            with autocast_context(self.device, stage.train.precision):
                student_out = self.student_tap(images)
                teacher_outs = self.teacher_outputs(images)
                loss = loss_fn(student_out, teacher_outs, targets)
            flags = torch.stack([(~torch.isfinite(loss.detach())).double(), torch.tensor(float(self.stop.signum is not None), device=self.device)])
            bad_loss, stop = all_reduce_max(world, flags).tolist()  # every rank decides alike
            if bad_loss:
                if stage.train.on_nan == "stop":
                    raise TrainingError(
                        f"stage {stage.id!r}, epoch {epoch}, step {step}: the loss is {loss.item()}; training stopped",
                        fix='lower the learning rate or check the data; the last good checkpoint is kept '
                        f'({os.path.relpath(run.directory.checkpoint(stage.id, "last"))}); on_nan = "skip-batch" skips such batches',
                    )
                progress.skipped_batches += 1
                optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.zero_grad(set_to_none=True)
                local = images.shape[0]
                # Weight by this rank's share of the global batch: DDP averages the
                # ranks' gradients, so the sum equals the single-process gradient.
                global_batch = min(batch_size, dataset_size - (step - 1) * batch_size)
                weight = local * world.size / global_batch if world.distributed else 1.0
                scaler.scale(loss * weight if weight != 1.0 else loss).backward()
                if clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trained_parameters, clip)
                scaler.step(optimizer)
                scaler.update()
                totals[0] += loss.detach().double() * local
                totals[1] += (student_out.logits.detach().argmax(1) == targets).sum()
                totals[2] += local
            run.call("pyramidkd_batch_end", stage=stage, epoch=epoch, step=step, num_steps=num_steps, loss=loss.detach(),
                     on_error=lambda: self.save_mid_epoch(progress, epoch, step, totals))
            if stop:
                self.save_mid_epoch(progress, epoch, step, totals)
                signum = self.stop.signum or signal.SIGTERM
                raise RunInterrupted(
                    f"interrupted by {signal.Signals(signum).name} in stage {stage.id!r}, epoch {epoch}, step {step}/{num_steps}; "
                    f"the state is saved in {run.directory.checkpoint(stage.id, 'last')}",
                    signum=signum,
                    fix=f"resume with: pyramidkd run {run.recipe.file} --output {run.directory.path} --resume",
                )
        loss_sum, correct, seen = all_reduce_sum(world, totals).tolist()
        return loss_sum / max(seen, 1), correct / max(seen, 1)

    def teacher_outputs(self, images: torch.Tensor) -> list[ModelOutput]:
        """Frozen teachers under inference mode; their outputs are cloned into
        normal tensors so losses may save them for backward."""
        if not self.teacher_taps:
            return []
        with torch.inference_mode():
            outputs = [tap(images) for tap in self.teacher_taps]
        return [ModelOutput(o.logits.clone(), {k: v.clone() for k, v in o.features.items()}) for o in outputs]

    # -- checkpoints -----------------------------------------------------------
    def model_checkpoint(self, state: dict, epoch: int, val_acc: float) -> dict:
        data = self.run.data
        return {
            "model": {
                "name": self.stage.model.name,
                "params": attrs.asdict(self.stage.model.params),
                "num_classes": data.num_classes,
                "input_shape": list(data.input_shape),
            },
            "state_dict": {k: v.detach().cpu() for k, v in state.items()},
            "stage": self.stage.id,
            "epoch": epoch,
            "val_acc": val_acc,
        }

    def save_last(self, progress: Progress) -> None:
        checkpoint = self.model_checkpoint(self.student.state_dict(), progress.epoch, progress.best_val_acc)
        checkpoint.update(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "grad_scaler": self.scaler.state_dict(),
                "loss_state": self.loss_fn.state_dict(),
                "progress": attrs.asdict(progress, recurse=False),
                "rng": rng_states(self.generator),
                "elapsed_s": time.time() - self.started,
                "level": self.stage.info.get("level"),
                "recipe_stage": self.stage.entry_id,
            }
        )
        if self.run.world.is_main:
            save_checkpoint(self.run.directory.checkpoint(self.stage.id, "last"), checkpoint)

    def save_mid_epoch(self, progress: Progress, epoch: int, step: int, totals: torch.Tensor) -> None:
        loss_sum, correct, seen = totals.tolist()
        saved = attrs.evolve(progress, epoch=epoch - 1, step=step, loss_sum=loss_sum, correct=int(correct), seen=int(seen))
        self.save_last(saved)

    def restore(self, checkpoint: dict) -> Progress:
        path = self.run.directory.checkpoint(self.stage.id, "last")
        load_state(self.student, checkpoint["state_dict"], path)
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            if self.scheduler is not None and checkpoint.get("scheduler") is not None:
                self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.loss_fn.load_state_dict(checkpoint.get("loss_state", {}))
            if checkpoint.get("grad_scaler"):
                self.scaler.load_state_dict(checkpoint["grad_scaler"])
            progress = Progress(**checkpoint["progress"])
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise CheckpointError(f"cannot resume from this checkpoint: {error}", file=path, fix="re-run with --force to start over") from error
        restore_rng_states(checkpoint["rng"], self.generator)
        if progress.best_epoch:
            self.best_state = load_checkpoint(self.run.directory.checkpoint(self.stage.id, "best"))["state_dict"]
        return progress

    # -- end of stage ------------------------------------------------------------
    def finish(self, progress: Progress) -> dict:
        run, stage = self.run, self.stage
        self.student.load_state_dict(self.best_state)
        test_loss, test_acc = evaluate(self.student, self.loader(run.data.test, train=False), self.device, run.world, self.prepare_images)
        result = {
            "stage": stage.id,
            "entry": stage.entry_id,
            "model": stage.model.name,
            "model_params": stage.model.as_dict(),
            "loss": stage.loss.name,
            "params": count_parameters(self.student),
            "epochs": stage.train.epochs,
            "select": stage.select,
            "best_epoch": progress.best_epoch,
            "best_val_acc": progress.best_val_acc,
            "last_val_acc": progress.history[-1]["val_acc"] if progress.history else None,
            "test_acc": test_acc,
            "test_loss": test_loss,
            "teachers": [self.describe_source(source) for source in stage.teachers],
            "inherited_tensors": len(self.inherited),
            "reference_test_acc": run.reference_for(stage),
            "info": stage.info,
            "checkpoint": os.path.relpath(run.directory.checkpoint(stage.id, "best"), run.directory.path),
            "time_s": round(time.time() - self.started, 3),
        }
        record = {"kind": "test", "stage": stage.id, "entry": stage.entry_id, "epoch": progress.best_epoch,
                  "val_acc": progress.best_val_acc, "test_acc": test_acc, "test_loss": test_loss}
        run.call("pyramidkd_metrics", stage=stage, record=record)
        return result

    @torch.no_grad()
    def setup_loss(self, loss_fn, dataset) -> None:
        images = torch.stack([dataset[i][0] for i in range(min(2, len(dataset)))]).to(self.device)
        self.student_tap.model.eval()
        loss_fn.setup(self.student_tap(self.prepare_images(images)), self.teacher_outputs(self.prepare_images(images)))
        loss_fn.to(self.device)

    def describe_source(self, source: ModelSource) -> dict:
        if isinstance(source, StageOutput):
            earlier = self.run.results.get(source.stage_id, {})
            return {"stage": source.stage_id, "model": earlier.get("model"), "test_acc": earlier.get("test_acc")}
        return {"file": source.path}

    @torch.no_grad()
    def stage_loss(self, loader) -> float:
        self.student.eval()
        self.loss_fn.eval()
        total, seen = 0.0, 0
        for images, targets in loader:
            images, targets = images.to(self.device), targets.to(self.device)
            images = self.prepare_images(images)
            with autocast_context(self.device, self.stage.train.precision):
                loss = self.loss_fn(self.student_tap(images), self.teacher_outputs(images), targets)
            total += float(loss) * images.shape[0]
            seen += images.shape[0]
        totals = all_reduce_sum(self.run.world, torch.tensor([total, seen], dtype=torch.float64, device=self.device)).tolist()
        return totals[0] / max(totals[1], 1)
