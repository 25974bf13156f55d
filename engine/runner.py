"""Runs the planned stages, all with the same loop.

train epoch -> validation -> ``best`` checkpoint by validation accuracy (or the
stage's own validation loss for feature-matching stages) -> at the end, test
accuracy of the best checkpoint. Teachers are frozen (eval mode, no grad).
"""

from __future__ import annotations

import math
import os
import random
import time
import zlib
from typing import Any, Iterable, Sequence

import attrs
import numpy as np
import torch
from torch import nn

from .components import (
    CheckpointFile,
    ComponentSpec,
    DatasetContext,
    DataSplits,
    Loss,
    ModelOutput,
    ModelSource,
    StageOutput,
    StagePlan,
)
from .errors import CheckpointError, RecipeError, UserError
from .host import PluginHost, make_plugin_host
from .planning import plan_recipe
from .recipe import Recipe, TrainSection, dump_toml, load_recipe, resolve_component
from .rundir import RunDirectory, command_line, default_output_dir, load_checkpoint, save_checkpoint, atomic_write_json
from .validation import Structurer


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss became NaN)."""


@attrs.define
class PreparedRun:
    """A recipe that passed every check short of training."""

    recipe: Recipe
    host: PluginHost
    stages: list[StagePlan]
    dataset: ComponentSpec
    loggers: list[ComponentSpec]


def prepare(recipe_path: str, overrides: Sequence[str] = (), extra_plugins: Iterable[object] = ()) -> PreparedRun:
    recipe = load_recipe(recipe_path, overrides)
    host = make_plugin_host(
        recipe.experiment.plugins,
        extra_plugins=extra_plugins,
        local_search_path=recipe.directory,
        recipe_file=recipe.file,
    )
    registries = host.registries
    dataset = resolve_component(recipe, registries, "dataset", recipe.dataset)
    loggers = [resolve_component(recipe, registries, "logger", raw) for raw in recipe.loggers]
    stages = plan_recipe(recipe, registries)
    for stage_id in recipe.reference:
        if not any(stage.id == stage_id or stage.entry_id == stage_id for stage in stages):
            raise RecipeError(
                f"reference for unknown stage {stage_id!r}",
                file=recipe.file,
                key=f"reference.{stage_id}",
                fix=f"use a stage id: {', '.join(s.id for s in stages)}",
            )
    return PreparedRun(recipe, host, stages, dataset, loggers)


def dataset_context(recipe: Recipe) -> DatasetContext:
    cache = os.environ.get("PYRAMIDKD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pyramidkd"))
    return DatasetContext(seed=recipe.experiment.seed, recipe_dir=recipe.directory, cache_dir=cache)


def choose_device(recipe: Recipe) -> torch.device:
    wanted = recipe.experiment.device
    if wanted == "cuda" and not torch.cuda.is_available():
        key = "experiment.device"
        raise RecipeError("device = \"cuda\" but no CUDA GPU is visible", file=recipe.file, key=key, fix='use device = "auto" or "cpu"')
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_seed(seed: int, stage_id: str) -> int:
    # Depends on the stage id, not its position, so re-running or skipping
    # earlier stages leaves a stage's randomness unchanged.
    return zlib.crc32(f"{seed}:{stage_id}".encode()) & 0x7FFFFFFF


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@attrs.define
class Run:
    """What lifecycle hooks receive as ``run``."""

    recipe: Recipe
    directory: RunDirectory
    device: torch.device
    stages: list[StagePlan]
    host: PluginHost
    data: DataSplits
    quiet: bool
    seed: int
    results: dict[str, dict] = attrs.field(factory=dict)
    started: float = attrs.field(factory=time.time)

    def reference_for(self, stage: StagePlan) -> float | None:
        """The published accuracy for a stage: by its id, or by its entry's id when
        it is that entry's final stage."""
        reference = self.recipe.reference
        if stage.id in reference:
            return reference[stage.id]
        last_of_entry = [s.id for s in self.stages if s.entry_id == stage.entry_id][-1]
        return reference.get(stage.entry_id) if stage.id == last_of_entry else None


class TapRecorder:
    """Runs a model and records the tensors at its tap points (forward hooks)."""

    def __init__(self, model: nn.Module, taps: dict[str, str], *, role: str, stage_id: str):
        self.model = model
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
        logits = self.model(images)
        return ModelOutput(logits, self.values)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def build_model(spec: ComponentSpec, data: DataSplits) -> nn.Module:
    return spec.instantiate().build(data.num_classes, tuple(data.input_shape))


def model_from_checkpoint(checkpoint: dict, path: str, host: PluginHost) -> tuple[nn.Module, dict]:
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
        if missing:
            details.append(f"missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            details.append(f"unexpected: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        if mismatched:
            details.append(f"shape mismatch (file vs model): {', '.join(mismatched[:6])}{' ...' if len(mismatched) > 6 else ''}")
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


class StageRunner:
    """Trains one stage."""

    def __init__(self, run: Run, stage: StagePlan, teacher_cache: dict):
        self.run = run
        self.stage = stage
        self.device = run.device
        self.teacher_cache = teacher_cache

    # -- models ------------------------------------------------------------
    def source_checkpoint(self, source: ModelSource) -> tuple[dict, str]:
        if isinstance(source, StageOutput):
            path = self.run.directory.checkpoint(source.stage_id, "best")
        else:
            path = source.path
        return load_checkpoint(path), path

    def teacher(self, source: ModelSource) -> nn.Module:
        if source not in self.teacher_cache:  # a teacher shared by stages is loaded once
            checkpoint, path = self.source_checkpoint(source)
            model, _ = model_from_checkpoint(checkpoint, path, self.run.host)
            model.to(self.device).eval()
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            self.teacher_cache[source] = model
        return self.teacher_cache[source]

    def loader(self, dataset, *, train: bool, generator: torch.Generator | None = None):
        settings = self.stage.train
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=settings.batch_size if train else settings.eval_batch_size,
            shuffle=train,
            generator=generator,
            num_workers=settings.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=settings.num_workers > 0,
        )

    # -- the loop ----------------------------------------------------------
    def execute(self) -> dict:
        run, stage, hook = self.run, self.stage, self.run.host.hook
        started = time.time()
        seed = stage_seed(run.seed, stage.id)
        seed_everything(seed)
        student = build_model(stage.model, run.data)
        inherited: list[str] = []
        if stage.init_from is not None:
            checkpoint, _ = self.source_checkpoint(stage.init_from)
            inherited = inherit_weights(student, checkpoint["state_dict"])
        student.to(self.device)
        teachers = [self.teacher(source) for source in stage.teachers]
        loss_fn = stage.loss.instantiate().to(self.device)

        student_tap = TapRecorder(student, stage.student_taps, role="student", stage_id=stage.id)
        teacher_taps = [TapRecorder(t, stage.teacher_taps, role="teacher", stage_id=stage.id) for t in teachers]
        generator = torch.Generator().manual_seed(seed)
        train_loader = self.loader(run.data.train, train=True, generator=generator)
        val_loader = self.loader(run.data.val, train=False)
        if type(loss_fn).setup is not Loss.setup:  # shape-dependent loss parameters
            self.setup_loss(loss_fn, student_tap, teacher_taps, run.data.train)

        trainable = []
        for name, parameter in student.named_parameters():
            wanted = stage.trainable is None or any(name == p or name.startswith(p + ".") for p in stage.trainable)
            parameter.requires_grad_(wanted)
            if wanted:
                trainable.append(parameter)
        trainable += [p for p in loss_fn.parameters() if p.requires_grad]
        if not trainable:
            raise RecipeError(f"stage {stage.id!r} has no trainable parameters", fix="check the scheme's trainable layers")
        optimizer = make_optimizer(trainable, stage.train)
        scheduler = make_scheduler(optimizer, stage.train)

        hook.pyramidkd_stage_start(run=run, stage=stage)
        best_score, best_epoch, best_state = -math.inf, 0, None
        best_val_acc = 0.0
        try:
            for epoch in range(1, stage.train.epochs + 1):
                epoch_started = time.time()
                train_loss, train_acc = self.train_epoch(epoch, student, student_tap, teacher_taps, loss_fn, optimizer, train_loader)
                val_loss, val_acc = evaluate(student, val_loader, self.device)
                stage_val_loss = None
                if stage.select == "val_loss":
                    stage_val_loss = self.stage_loss(student_tap, teacher_taps, loss_fn, val_loader)
                score = {"val_acc": val_acc, "val_loss": -(stage_val_loss or 0.0), "last": float(epoch)}[stage.select]
                lr = optimizer.param_groups[0]["lr"]
                if scheduler is not None:
                    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        scheduler.step(val_acc)
                    else:
                        scheduler.step()
                improved = score > best_score
                if improved:
                    best_score, best_epoch, best_val_acc = score, epoch, val_acc
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
                    save_checkpoint(run.directory.checkpoint(stage.id, "best"), self.checkpoint(best_state, epoch, val_acc))
                save_checkpoint(run.directory.checkpoint(stage.id, "last"), self.checkpoint(student.state_dict(), epoch, val_acc))
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
                    "best_val_acc": best_val_acc,
                    "best_epoch": best_epoch,
                    "lr": lr,
                    "epoch_time_s": round(time.time() - epoch_started, 4),
                }
                hook.pyramidkd_epoch_end(run=run, stage=stage, epoch=epoch, metrics=record)
                hook.pyramidkd_metrics(run=run, stage=stage, record=record)
        finally:
            student_tap.close()
            for tap in teacher_taps:
                tap.close()

        student.load_state_dict(best_state)
        test_loader = self.loader(run.data.test, train=False)
        test_loss, test_acc = evaluate(student, test_loader, self.device)
        teacher_results = [self.describe_source(source) for source in stage.teachers]
        result = {
            "stage": stage.id,
            "entry": stage.entry_id,
            "model": stage.model.name,
            "model_params": stage.model.as_dict(),
            "loss": stage.loss.name,
            "params": count_parameters(student),
            "epochs": stage.train.epochs,
            "select": stage.select,
            "best_epoch": best_epoch,
            "best_val_acc": best_val_acc,
            "test_acc": test_acc,
            "test_loss": test_loss,
            "teachers": teacher_results,
            "inherited_tensors": len(inherited),
            "reference_test_acc": run.reference_for(stage),
            "info": stage.info,
            "checkpoint": os.path.relpath(run.directory.checkpoint(stage.id, "best"), run.directory.path),
            "time_s": round(time.time() - started, 3),
        }
        test_record = {"kind": "test", "stage": stage.id, "entry": stage.entry_id, "epoch": best_epoch, "val_acc": best_val_acc, "test_acc": test_acc, "test_loss": test_loss}
        hook.pyramidkd_metrics(run=run, stage=stage, record=test_record)
        atomic_write_json(run.directory.stage_result_file(stage.id), result)
        return result

    @torch.no_grad()
    def setup_loss(self, loss_fn, student_tap, teacher_taps, dataset) -> None:
        images = torch.stack([dataset[i][0] for i in range(min(2, len(dataset)))]).to(self.device)
        student_tap.model.eval()
        loss_fn.setup(student_tap(images), [tap(images) for tap in teacher_taps])
        loss_fn.to(self.device)

    def describe_source(self, source: ModelSource) -> dict:
        if isinstance(source, StageOutput):
            earlier = self.run.results.get(source.stage_id, {})
            return {"stage": source.stage_id, "model": earlier.get("model"), "test_acc": earlier.get("test_acc")}
        return {"file": source.path}

    def checkpoint(self, state: dict, epoch: int, val_acc: float) -> dict:
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

    def train_epoch(self, epoch, student, student_tap, teacher_taps, loss_fn, optimizer, loader) -> tuple[float, float]:
        run, stage, hook = self.run, self.stage, self.run.host.hook
        student.train()
        loss_fn.train()
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        num_steps = len(loader)
        clip = stage.train.grad_clip
        for step, (images, targets) in enumerate(loader, start=1):
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            student_out = student_tap(images)
            with torch.no_grad():
                teacher_outs = [tap(images) for tap in teacher_taps]
            loss = loss_fn(student_out, teacher_outs, targets)
            if not torch.isfinite(loss).item():
                raise TrainingError(
                    f"stage {stage.id!r}, epoch {epoch}, step {step}: the loss is {loss.item()}",
                    fix="lower the learning rate or check the inputs; the last good checkpoint is kept",
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
            optimizer.step()
            detached = loss.detach()
            total_loss += detached * images.shape[0]
            correct += (student_out.logits.detach().argmax(1) == targets).sum()
            seen += images.shape[0]
            hook.pyramidkd_batch_end(run=run, stage=stage, epoch=epoch, step=step, num_steps=num_steps, loss=detached)
        return float(total_loss) / max(seen, 1), float(correct) / max(seen, 1)

    @torch.no_grad()
    def stage_loss(self, student_tap, teacher_taps, loss_fn, loader) -> float:
        student_tap.model.eval()
        loss_fn.eval()
        total, seen = 0.0, 0
        for images, targets in loader:
            images, targets = images.to(self.device), targets.to(self.device)
            loss = loss_fn(student_tap(images), [tap(images) for tap in teacher_taps], targets)
            total += float(loss) * images.shape[0]
            seen += images.shape[0]
        return total / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (a fraction) of ``model`` on ``loader``."""
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = model(images)
        total_loss += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        correct += (logits.argmax(1) == targets).sum()
        seen += images.shape[0]
    return float(total_loss) / max(seen, 1), float(correct) / max(seen, 1)


def run_recipe(
    recipe_path: str,
    overrides: Sequence[str] = (),
    *,
    output: str | None = None,
    quiet: bool = False,
    force: bool = False,
    extra_plugins: Iterable[object] = (),
) -> dict:
    """Run a whole recipe; return the summary (also written to summary.json)."""
    prepared = prepare(recipe_path, overrides, extra_plugins)
    recipe, host = prepared.recipe, prepared.host
    device = choose_device(recipe)
    directory = RunDirectory(output or default_output_dir(recipe.experiment.name))
    directory.prepare(dump_toml(recipe.data))
    data = prepared.dataset.instantiate().load(dataset_context(recipe))

    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    run = Run(recipe, directory, device, prepared.stages, host, data, quiet, recipe.experiment.seed)
    for index, spec in enumerate(prepared.loggers):
        host.register_run_plugin(spec.instantiate(), name=f"logger:{spec.name}:{index}")
    directory.write_manifest(seed=run.seed, device=str(device), recipe_file=recipe.file, started=run.started, finished=None, argv=command_line())
    host.hook.pyramidkd_run_start(run=run)
    teacher_cache: dict = {}
    for stage in prepared.stages:
        previous = None if force else directory.stage_result(stage.id)
        if previous is not None:
            result = {**previous, "skipped": True}
            run.results[stage.id] = result
            host.hook.pyramidkd_stage_end(run=run, stage=stage, result=result)
            continue
        result = StageRunner(run, stage, teacher_cache).execute()
        run.results[stage.id] = result
        host.hook.pyramidkd_stage_end(run=run, stage=stage, result=result)
    finished = time.time()
    summary = {
        "experiment": recipe.experiment.name,
        "recipe": os.path.abspath(recipe.file),
        "seed": run.seed,
        "device": str(device),
        "dataset": {"name": prepared.dataset.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
                    "train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "stages": [run.results[stage.id] for stage in prepared.stages],
        "time_s": round(finished - run.started, 3),
    }
    atomic_write_json(directory.file("summary.json"), summary)
    directory.write_manifest(seed=run.seed, device=str(device), recipe_file=recipe.file, started=run.started, finished=finished, argv=command_line())
    host.hook.pyramidkd_run_end(run=run, summary=summary)
    return summary
