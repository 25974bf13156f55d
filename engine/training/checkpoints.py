"""The checkpoint file: a self-describing ``torch.save`` dict, written atomically.

Every checkpoint names its model (class name, parameters, classes, input shape), so
a teacher or ``init_from`` file can be rebuilt without the recipe that wrote it.
A stage's ``last`` checkpoint adds the full training state (see :mod:`.loop`).
"""

from __future__ import annotations

import io
import os
from typing import Any

import attrs
import torch

from ..errors import CheckpointError
from ..rundir import atomic_write_bytes

CHECKPOINT_FORMAT = "pyramidkd-checkpoint"


def save_checkpoint(path: str, checkpoint: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError("checkpoint file not found", file=path, fix="check the path, or re-run the stage that writes it")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(
            f"cannot read the checkpoint ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); the file is corrupt or truncated",
            file=path,
            fix="delete it and re-run the stage that writes it (pyramidkd run ... --force)",
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            "not a pyramidkd checkpoint (no model description inside)",
            file=path,
            fix="use a checkpoint written by pyramidkd (checkpoints/<stage>/best.pt of a run)",
        )
    return checkpoint


def model_checkpoint(stage, data, state: dict[str, torch.Tensor], *, epoch: int, val_acc: float) -> dict[str, Any]:
    """The part every checkpoint holds: the model's description and weights.

    ``stage`` is the :class:`~pyramidkd.engine.components.StagePlan`, ``data`` the
    run's :class:`~pyramidkd.engine.components.DataSplits`.
    """
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
    }
