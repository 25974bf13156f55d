"""The checkpoint file and what goes into it: a self-describing ``torch.save``
dict, written atomically and read as data only (:mod:`.safe_load`).

Every checkpoint names its model (class name, parameters, classes, input shape), so
a teacher or ``init_from`` file can be rebuilt without the recipe that wrote it
(:func:`model_checkpoint`). A stage's ``last`` checkpoint adds the full training
state — optimiser, scheduler, loss state, :class:`~.progress.Progress`, every RNG
state — so a resumed stage continues exactly (:func:`last_checkpoint`,
:func:`restore_state`). A ``.safetensors`` file (``pyramidkd save-weights``) holds
tensors and JSON only (:mod:`.weights`).
"""

from __future__ import annotations

import io
import os
from typing import Any

import attrs
import torch

from ..components import DataSplits, StagePlan
from ..deploy.preprocessing import describe_preprocessing
from ..errors import CheckpointError
from ..records import EpochRecord
from ..rundir import atomic_write_bytes
from .models import load_state
from .progress import Progress
from .rng import restore_rng_states, rng_states
from .safe_load import read_data_only

CHECKPOINT_FORMAT = "pyramidkd-checkpoint"
SAFETENSORS_SUFFIX = ".safetensors"


def save_checkpoint(path: str, checkpoint: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str) -> dict:
    """A pyramidkd checkpoint (``.pt``) or weights file (``.safetensors``), read as data
    only; a file that needs other Python globals raises :class:`UnsafeCheckpointError`."""
    if not os.path.exists(path):
        raise CheckpointError("checkpoint file not found", file=path, fix="check the path, or re-run the stage that writes it")
    if path.endswith(SAFETENSORS_SUFFIX):
        from .weights import read_weights

        checkpoint = {"format": CHECKPOINT_FORMAT, **read_weights(path)}
    else:
        checkpoint = read_data_only(path)
    check_checkpoint(checkpoint, path)
    return checkpoint


def check_checkpoint(checkpoint: Any, path: str) -> None:
    """A pyramidkd checkpoint: the format mark, a model description and a state dict."""
    model = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    described = (isinstance(model, dict) and isinstance(model.get("name"), str) and isinstance(model.get("num_classes"), int)
                 and isinstance(model.get("input_shape"), (list, tuple)) and isinstance(checkpoint.get("state_dict"), dict))
    if not described or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            "not a pyramidkd checkpoint (no model description inside)",
            file=path,
            fix="use a checkpoint written by pyramidkd: checkpoints/<stage>/best.pt of a run, or a .safetensors file "
                "from `pyramidkd save-weights` (a bare state_dict does not say which model it belongs to)",
        )


def model_checkpoint(stage: StagePlan, data: DataSplits, state: dict[str, torch.Tensor], *, epoch: int,
                     val_acc: float) -> dict[str, Any]:
    """The part every checkpoint holds: the model's description and weights."""
    return {
        "model": {
            "name": stage.model.name,
            "params": attrs.asdict(stage.model.params),
            "num_classes": data.num_classes,
            "input_shape": list(data.input_shape),
        },
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "stage": stage.id,
        "epoch": epoch,
        "val_acc": val_acc,
        "class_names": [str(name) for name in getattr(data, "class_names", None) or []],
        "preprocessing": describe_preprocessing(data),  # how raw images become inputs (engine/deploy)
    }


# --- a stage's `last` checkpoint: the training state ------------------------------


def last_checkpoint(run, stage: StagePlan, state, progress: Progress, *, elapsed_s: float, fingerprint: str | None,
                    cuda_ranks: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """The ``last`` checkpoint: the model plus all a resumed stage needs to continue exactly.
    ``run`` is the :class:`~pyramidkd.engine.lifecycle.Run`, ``state`` the stage's
    :class:`~.state.StageState` (which imports this module: so not named here);
    ``cuda_ranks``: every rank's CUDA generator state, see :func:`.rng.rng_states`."""
    checkpoint = model_checkpoint(stage, run.data, state.student.state_dict(), epoch=progress.epoch, val_acc=progress.best_val_acc)
    checkpoint.update(
        {
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
            "grad_scaler": state.scaler.state_dict(),
            "loss_state": state.loss_fn.state_dict(),
            "progress": _progress_record(progress),
            "rng": rng_states(state.generator, cuda_ranks),
            "elapsed_s": elapsed_s,
            "level": stage.info.get("level"),
            "recipe_stage": stage.entry_id,
            "fingerprint": fingerprint,
            "pipeline": getattr(run, "pipeline", None),  # resuming on the other pipeline is not exact
        }
    )
    return checkpoint


def restore_state(state, checkpoint: dict, path: str, best_path: str, rank: int = 0) -> Progress:
    """Load a ``last`` checkpoint into ``state`` (the :class:`~.state.StageState`, RNG
    states included); return its progress."""
    load_state(state.student, checkpoint["state_dict"], path)
    try:
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        if state.scheduler is not None and checkpoint.get("scheduler") is not None:
            state.scheduler.load_state_dict(checkpoint["scheduler"])
        state.loss_fn.load_state_dict(checkpoint.get("loss_state", {}))
        if checkpoint.get("grad_scaler"):
            state.scaler.load_state_dict(checkpoint["grad_scaler"])
        progress = saved_progress(checkpoint)
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(f"cannot resume from this checkpoint: {error}", file=path, fix="re-run with --force to start over") from error
    restore_rng_states(checkpoint["rng"], state.generator, rank)
    if progress.best_epoch:
        state.best_state = load_checkpoint(best_path)["state_dict"]
    return progress


def saved_progress(checkpoint: dict) -> Progress:
    """Where the stage of a ``last`` checkpoint stood."""
    data = checkpoint["progress"]
    return Progress(**{**data, "history": [EpochRecord.from_dict(record) for record in data["history"]]})


def _progress_record(progress: Progress) -> dict[str, Any]:
    # records as plain dicts: a checkpoint must not depend on class paths
    return {**attrs.asdict(progress, recurse=False), "history": [record.to_dict() for record in progress.history]}
