"""One training stage: the loop every scheme's stages share, resumable to the step.

A ``last`` checkpoint (written atomically at the end of every epoch, and mid-epoch
when a run is interrupted) holds the model, optimiser, scheduler, loss-module state,
the position (epoch, step), the best-so-far metric, the stage's metrics history and
every RNG state (python, numpy, torch CPU and CUDA, the data-loader generator), so a
resumed stage continues exactly as if it had never stopped.

Host-device sync points (each waits for the GPU's queued work), as nanoGPT names
them; a training step has none of its own except where marked:

* the non-finite-loss check, every ``CHECK_EVERY`` steps and at an epoch's last step
  (every step with ``on_nan = "skip-batch"``), under DDP with the ranks' stop flags
  in one all-reduce (:class:`~.stops.StepChecks`);
* fp16 only: ``GradScaler.step`` reads its inf/NaN flag every step (PyTorch's own);
* once per epoch: the epoch's sums and the non-finite flag, in one all-reduce
  (``train_epoch``), each evaluation's sums (:mod:`.evaluate`), the best weights
  copied to the CPU when they improve, the epoch's order copied to the data's
  device (:mod:`pyramidkd.engine.data.batches`);
* the ``DataLoader`` path with ``pin_memory = false``: each batch's copy to the GPU;
* only when saving mid-epoch: the check and the running sums;
* under torchrun on GPUs, at each save: every rank's CUDA generator state, gathered;
* plugins: ``pyramidkd_batch_end`` receives the loss as a tensor; reading it
  (the console's progress bar does every 10 steps, on a terminal) is a sync.
"""

from __future__ import annotations

import logging
import os
import time

import attrs
import torch

from ..components import ModelSource, StageOutput, StagePlan
from ..data.batches import make_loader
from ..data.plan import BatchPlan
from ..distributed import all_gather_tensors, all_reduce_sum
from ..records import EpochRecord, StageResult, TeacherRef, TestRecord
from .checkpoints import last_checkpoint, model_checkpoint, restore_state, save_checkpoint
from .evaluate import autocast_context, best_test_acc, evaluate, stage_loss
from .models import count_macs, count_parameters, training_macs
from .optim import step_scheduler
from .rng import restore_rng_states, rng_states
from .progress import Progress
from .state import StageState, build_stage_state
from .stops import SavedPosition, StepChecks, StopFlag


log = logging.getLogger("pyramidkd")


class StageRunner:
    """Trains one stage (``run`` is the :class:`~pyramidkd.engine.runner.Run`)."""

    def __init__(self, run, stage: StagePlan, teacher_cache: dict, stop: StopFlag | None = None, fingerprint: str | None = None):
        self.run = run
        self.stage = stage
        self.device = run.device
        self.teacher_cache = teacher_cache
        self.stop = stop or StopFlag()
        self.fingerprint = fingerprint
        self.state: StageState | None = None
        self.started = time.time()
        self.batch_plan: BatchPlan | None = None  # the training batches' geometry, known once the loader exists

    # -- the stage -----------------------------------------------------------
    def execute(self, resume_checkpoint: dict | None = None) -> StageResult:
        progress = self.setup(resume_checkpoint)
        self.run.call("pyramidkd_stage_start", stage=self.stage)
        try:
            self.train(progress)
        finally:
            self.close()
        return self.finish(progress)

    def setup(self, resume_checkpoint: dict | None = None) -> Progress:
        """Build what the stage trains on (restored from ``resume_checkpoint`` if
        given); return where training stands."""
        self.stop.enter_stage(self.stage.id)
        started = time.time()
        self.state = build_stage_state(self.run, self.stage, self.teacher_cache)
        progress = Progress()
        elapsed_before = 0.0
        if resume_checkpoint is not None:
            path = self.checkpoint_path("last")
            progress = restore_state(self.state, resume_checkpoint, path, self.checkpoint_path("best"), self.run.world.rank)
            elapsed_before = resume_checkpoint.get("elapsed_s", 0.0)
            self.warn_on_another_pipeline(resume_checkpoint.get("pipeline", resume_checkpoint.get("data_path")))  # 0.2 wrote data_path
            self.stop.record_save(SavedPosition(path, progress.epoch, progress.step))
        self.started = started - elapsed_before  # a stage's time includes the time before an interruption
        return progress

    def warn_on_another_pipeline(self, saved: str | None) -> None:
        """``pipeline = "auto"`` decides per run: say so when it chose differently this time."""
        current = getattr(self.run, "pipeline", None)
        if saved is None or current is None or saved == current or not self.run.world.is_main:
            return
        log.warning(f"stage {self.stage.id!r} was interrupted on the {saved} data path and continues on the {current} path "
                    f"(pipeline = \"auto\" chose differently this time, see engine/data/pipeline.py): its result will not be "
                    "bit-identical to an uninterrupted run's")

    def close(self) -> None:
        if self.state is not None:
            self.state.close()

    def checkpoint_path(self, which: str) -> str:
        return self.run.directory.checkpoint(self.stage.id, which)

    def loader(self, dataset, *, train: bool, generator: torch.Generator | None = None):
        """Training batches (:class:`~pyramidkd.engine.data.batches.TensorBatches` or
        :class:`~pyramidkd.engine.data.batches.LoaderBatches`, with indices for a loss with ``needs_indices``)
        or evaluation batches of ``dataset``, on the run's pipeline."""
        augmentation = getattr(self.run.data, "augmentation", None) if train else None
        return make_loader(dataset, self.stage.train, self.run.world, self.device, train=train, generator=generator,
                           augmentation=augmentation, indices=train and bool(getattr(self.state.loss_fn, "needs_indices", False)))

    # -- epochs ----------------------------------------------------------------
    def train(self, progress: Progress) -> None:
        run, stage = self.run, self.stage
        train_loader = self.loader(run.data.train, train=True, generator=self.state.generator)
        val_loader = self.loader(run.data.val, train=False)
        test_loader = self.loader(run.data.test, train=False) if stage.train.test_every_epoch else None
        self.batch_plan = train_loader.plan
        for epoch in range(progress.epoch + 1, stage.train.epochs + 1):
            self.state.loss_fn.start_epoch(epoch)  # also the first epoch after a resume: warm-ups stay exact
            epoch_started = time.time()
            with self.state.teachers_in_training_mode():  # batch statistics where the loss asks (ofd)
                train_loss, train_acc = self.train_epoch(epoch, train_loader, progress)
            train_time = time.time() - epoch_started
            record = self.validate_epoch(epoch, val_loader, progress, train_loss=train_loss, train_acc=train_acc,
                                         train_time=train_time, epoch_started=epoch_started, test_loader=test_loader)
            progress.history.append(record)
            progress.end_epoch(epoch)
            # `last` first, then the hooks: a crash after this point loses nothing.
            self.save_last(progress)
            run.call("pyramidkd_epoch_end", stage=stage, epoch=epoch, metrics=record)
            run.call("pyramidkd_metrics", stage=stage, record=record)

    def validate_epoch(self, epoch: int, loader, progress: Progress, *, train_loss: float, train_acc: float,
                       train_time: float, epoch_started: float, test_loader=None) -> EpochRecord:
        """Validate, step the schedule, keep the best epoch; the epoch's record."""
        stage, state, settings = self.stage, self.state, self.stage.train
        val_loss, val_acc = evaluate(state.student, loader, self.device, precision=settings.precision, world=self.run.world,
                                     prepare=state.prepare_images)
        own_loss = stage_loss(state, loader, self.device, precision=settings.precision, world=self.run.world) if stage.select == "val_loss" else None
        score = {"val_acc": val_acc, "val_loss": -(own_loss or 0.0), "last": float(epoch)}[stage.select]
        lr = state.optimizer.param_groups[0]["lr"]
        step_scheduler(state.scheduler, val_acc)
        if score > progress.best_score:
            progress.best_score, progress.best_epoch, progress.best_val_acc = score, epoch, val_acc
            best = state.keep_best()  # sync point: the weights copied to the CPU
            if self.run.world.is_main:
                save_checkpoint(self.checkpoint_path("best"), model_checkpoint(stage, self.run.data, best, epoch=epoch, val_acc=val_acc))
        return EpochRecord(
            stage=stage.id, entry=stage.entry_id, epoch=epoch, epochs=settings.epochs,
            train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc, stage_val_loss=own_loss,
            best_val_acc=progress.best_val_acc, best_epoch=progress.best_epoch, lr=lr,
            skipped_batches=progress.skipped_batches, train_time_s=round(train_time, 4),
            epoch_time_s=round(time.time() - epoch_started, 4),
            test_acc=None if test_loader is None else evaluate(  # the final test's pass, on this epoch's model
                state.student, test_loader, self.device, precision=settings.precision, world=self.run.world,
                prepare=state.prepare_images)[1],
        )

    # -- steps -----------------------------------------------------------------
    def train_epoch(self, epoch: int, loader, progress: Progress) -> tuple[float, float]:
        """One pass over the training data (the rest of it, when resumed mid-epoch);
        the epoch's mean loss and accuracy over every rank."""
        state = self.state
        state.student.train()
        state.loss_fn.train()
        plan = loader.plan
        num_steps = plan.steps_per_epoch
        # The epoch's loss sum, correct and seen stay on the device, read once, at the epoch's end (with the
        # non-finite flag); StepChecks reads the device every CHECK_EVERY steps (every step with on_nan = "skip-batch").
        totals = torch.tensor([progress.loss_sum, progress.correct, progress.seen], dtype=torch.float64, device=self.device)
        checks = StepChecks(self.run.world, self.device, self.stop, self.stage, self.checkpoint_path("last"))
        step = progress.step
        for step, (images, targets, *indices) in enumerate(self.epoch_batches(epoch, loader, progress), start=progress.step + 1):
            images = state.prepare_images(images.to(self.device, non_blocking=True))
            targets = targets.to(self.device, non_blocking=True)
            state.start_batch(indices, self.device)  # the samples' indices, for a loss with needs_indices
            with autocast_context(self.device, self.stage.train.precision):
                student_out = state.student_tap(images)
                loss = state.loss_fn(student_out, state.teacher_outputs(images), targets)
            bad_loss, stop = checks.after_step(loss, step, num_steps)
            if bad_loss:
                self.skip_bad_batch(epoch, step, checks, progress)
            else:
                self.optimise(loss, plan.loss_weight(step, images.shape[0]))
                totals[0] += loss.detach().double() * images.shape[0]
                totals[1] += (student_out.logits.detach().argmax(1) == targets).sum()
                totals[2] += images.shape[0]
            self.run.call("pyramidkd_batch_end", stage=self.stage, epoch=epoch, step=step, num_steps=num_steps, loss=loss.detach(),
                          on_error=lambda: self.save_mid_epoch(progress, epoch, step, totals, checks, gather=False))
            if stop:
                self.save_mid_epoch(progress, epoch, step, totals, checks)
                raise self.stop.interrupted()
        # Sync point (and collective), once per epoch: the sums, and whether any rank saw a
        # non-finite loss since the last check (a tail batch dropped under DDP skips the last one).
        loss_sum, correct, seen, bad = all_reduce_sum(self.run.world, torch.cat([totals, checks.watch.flag()])).tolist()
        if bad:
            raise checks.nan_error(epoch, step)
        return loss_sum / max(seen, 1), correct / max(seen, 1)

    def epoch_batches(self, epoch: int, loader, progress: Progress):
        """The epoch's batches; resumed mid-epoch, the same shuffle (and augmentation)
        minus the batches done: the generator goes back to the epoch's start, the
        loader draws the epoch again and skips what was done."""
        generator = self.state.generator
        loader.set_epoch(epoch)
        if progress.step == 0:
            progress.epoch_loader_state = generator.get_state()
            return loader.epoch()
        saved_rng = rng_states(generator)
        generator.set_state(progress.epoch_loader_state)
        batches = loader.epoch(skip=progress.step)
        restore_rng_states(saved_rng, None)  # global RNGs as they were when interrupted
        return batches

    def skip_bad_batch(self, epoch: int, step: int, checks: StepChecks, progress: Progress) -> None:
        """The NaN policy: stop (the last good checkpoint is kept) or skip the batch."""
        if self.stage.train.on_nan == "stop":
            raise checks.nan_error(epoch, step)
        progress.skipped_batches += 1
        checks.watch.reset()
        self.state.optimizer.zero_grad(set_to_none=True)

    def optimise(self, loss: torch.Tensor, weight: float) -> None:
        """One optimiser step on ``loss * weight`` (``weight``: this rank's share of the
        global batch under DDP, from the batch plan; 1 in one process)."""
        state, settings = self.state, self.stage.train
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss * weight if weight != 1.0 else loss).backward()
        if settings.grad_clip > 0:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(state.trained_parameters, settings.grad_clip)
        state.scaler.step(state.optimizer)  # sync point under fp16 only: GradScaler reads its inf/NaN flag
        state.scaler.update()

    # -- saving ------------------------------------------------------------------
    def save_last(self, progress: Progress, *, gather: bool = True) -> None:
        """``gather``: collect every rank's CUDA generator state (a collective, so only
        where all ranks save together: epoch ends and agreed stops, not one rank's error)."""
        cuda_ranks = every_ranks_cuda_rng_state(self.run.world) if gather else None
        checkpoint = last_checkpoint(self.run, self.stage, self.state, progress, elapsed_s=time.time() - self.started,
                                     fingerprint=self.fingerprint, cuda_ranks=cuda_ranks)
        path = self.checkpoint_path("last")
        if self.run.world.is_main:
            save_checkpoint(path, checkpoint)
        num_steps = self.batch_plan.steps_per_epoch if self.batch_plan is not None else None
        self.stop.record_save(SavedPosition(path, progress.epoch, progress.step, num_steps))

    def save_mid_epoch(self, progress: Progress, epoch: int, step: int, totals: torch.Tensor, checks: StepChecks, *,
                       gather: bool = True) -> None:
        """Save ``last`` mid-epoch (a stop, a failing hook) — never weights trained on a
        non-finite loss the deferred check has not read yet: then the NaN stop instead."""
        if checks.watch.read() is not None:  # sync point, only when saving
            raise checks.nan_error(epoch, step)
        loss_sum, correct, seen = totals.tolist()  # sync point, only when saving
        self.save_last(attrs.evolve(progress, epoch=epoch - 1, step=step, loss_sum=loss_sum, correct=int(correct), seen=int(seen)),
                       gather=gather)

    # -- end of stage ------------------------------------------------------------
    def finish(self, progress: Progress) -> StageResult:
        run, stage, state = self.run, self.stage, self.state
        state.student.load_state_dict(state.best_state)
        test_loss, test_acc = evaluate(state.student, self.loader(run.data.test, train=False), self.device,
                                       precision=stage.train.precision, world=run.world, prepare=state.prepare_images)
        shape = tuple(run.data.input_shape)
        macs = count_macs(state.student, shape)
        teacher_macs = sum(count_macs(tap.model, shape) for tap in state.teacher_taps)
        result = StageResult(
            stage=stage.id,
            entry=stage.entry_id,
            model=stage.model.name,
            model_params=stage.model.as_dict(),
            loss=stage.loss.name,
            num_parameters=count_parameters(state.student),
            epochs=stage.train.epochs,
            select=stage.select,
            best_epoch=progress.best_epoch,
            best_val_acc=progress.best_val_acc,
            last_val_acc=progress.history[-1].val_acc if progress.history else None,
            test_acc=test_acc,
            test_loss=test_loss,
            teachers=tuple(describe_source(run, source) for source in stage.teachers),
            inherited_tensors=len(state.inherited),
            reference_test_acc=run.reference_for(stage),
            info=stage.info,
            checkpoint=os.path.relpath(self.checkpoint_path("best"), run.directory.path),
            time_s=round(time.time() - self.started, 3),
            fingerprint=self.fingerprint,
            macs=macs,
            train_macs=training_macs(macs, teacher_macs, len(run.data.train), stage.train.epochs),
            best_test_acc=best_test_acc(progress.history),
        )
        record = TestRecord(stage=stage.id, entry=stage.entry_id, epoch=progress.best_epoch, val_acc=progress.best_val_acc,
                            test_acc=test_acc, test_loss=test_loss)
        run.call("pyramidkd_metrics", stage=stage, record=record)
        return result


def describe_source(run, source: ModelSource) -> TeacherRef:
    """A teacher as a stage's result names it: an earlier stage of ``run`` (its model and test accuracy), or a file."""
    if isinstance(source, StageOutput):
        earlier = run.results.get(source.stage_id)
        return TeacherRef(stage=source.stage_id, model=earlier.model if earlier else None,
                          test_acc=earlier.test_acc if earlier else None)
    return TeacherRef(file=source.path)


def every_ranks_cuda_rng_state(world) -> list[torch.Tensor] | None:
    """Every rank's CUDA generator state in rank order under torchrun on GPUs, else None."""
    if not (world.distributed and torch.cuda.is_available()):
        return None
    return all_gather_tensors(world, torch.cuda.get_rng_state(torch.cuda.current_device()))
