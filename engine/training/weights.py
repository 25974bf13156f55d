"""Weights to share: a model as a ``.safetensors`` file, its description as JSON.

``safetensors`` stores tensors and a string-to-string metadata table, nothing that
runs when read: the ecosystem's format for sharing weights without code. A
pyramidkd weights file holds the model's ``state_dict`` and, under the metadata
key ``"pyramidkd"``, a JSON description: the model (name, parameters, classes,
input shape, as a checkpoint names it), where it comes from (stage, epoch,
validation accuracy) and what its inputs look like (dataset, input shape,
mean/std and class names where known). The same JSON is written beside the file
(``NAME.json``) for people and tools; a file without the metadata entry (e.g.
re-saved by another tool) is read with the JSON beside it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..errors import CheckpointError
from ..rundir import atomic_write_bytes, atomic_write_text

WEIGHTS_FORMAT = "pyramidkd-weights"
WEIGHTS_VERSION = 1
METADATA_KEY = "pyramidkd"


def sidecar_path(path: str) -> str:
    """``teacher.safetensors`` -> ``teacher.json``."""
    return os.path.splitext(path)[0] + ".json"


def weights_description(checkpoint: dict, preprocessing: dict) -> dict[str, Any]:
    """The JSON a weights file carries, from a checkpoint's model description."""
    return {
        "format": WEIGHTS_FORMAT,
        "version": WEIGHTS_VERSION,
        "model": checkpoint["model"],
        "stage": checkpoint.get("stage"),
        "epoch": checkpoint.get("epoch"),
        "val_acc": checkpoint.get("val_acc"),
        "preprocessing": preprocessing,
    }


def write_weights(path: str, state_dict: dict[str, torch.Tensor], description: dict) -> str:
    """Write ``path`` (``.safetensors``) and the JSON beside it; returns the JSON's path."""
    from safetensors.torch import save

    # safetensors refuses tensors that share memory: each is its own contiguous copy
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()}
    text = json.dumps(description, sort_keys=True)
    atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: text}))
    beside = sidecar_path(path)
    atomic_write_text(beside, json.dumps(description, indent=2, sort_keys=True) + "\n")
    return beside


def read_weights(path: str) -> dict[str, Any]:
    """A weights file as the parts of a checkpoint it holds (``model``, ``state_dict``,
    ``stage``, ``epoch``, ``val_acc``, ``class_names``, ``preprocessing``)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"cannot read the safetensors file ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})",
                              file=path, fix="re-export it with `pyramidkd save-weights RUN_DIR --stage ID`") from error
    description = _description(path, metadata)
    preprocessing = description.get("preprocessing") or {}
    return {
        "model": description.get("model"),
        "state_dict": state,
        "stage": description.get("stage"),
        "epoch": description.get("epoch"),
        "val_acc": description.get("val_acc"),
        "class_names": list(preprocessing.get("class_names") or []),
        "preprocessing": preprocessing,
    }


def _description(path: str, metadata: dict[str, str]) -> dict:
    text, where = metadata.get(METADATA_KEY), "its metadata"
    if text is None and os.path.exists(sidecar_path(path)):
        where = sidecar_path(path)
        with open(where, encoding="utf-8") as handle:
            text = handle.read()
    try:
        description = json.loads(text) if text is not None else None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"the model description in {where} is not valid JSON ({error})", file=path,
                              fix="re-export it with `pyramidkd save-weights RUN_DIR --stage ID`") from None
    if not isinstance(description, dict) or description.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(
            f"not a pyramidkd weights file (no model description in its metadata key {METADATA_KEY!r} or in "
            f"{os.path.basename(sidecar_path(path))} beside it)",
            file=path,
            fix="use a .safetensors file written by `pyramidkd save-weights` (it names the model the weights belong to)",
        )
    return description
