"""A checkpoint as a plain PyTorch model, no recipe needed: ``pyramidkd.load_model(path)``.

The model is rebuilt from the checkpoint's own description (the class from the
plugin registry, its parameters, classes and input shape; see
:func:`~pyramidkd.engine.training.models.model_from_checkpoint`), its weights
loaded, put in eval mode, and given what a deployer needs beside it:

* ``model.transform`` — PIL image or uint8 tensor in, normalised input tensor out
  (:func:`.preprocessing.preprocessing_transform`);
* ``model.preprocessing`` — the JSON description it was built from;
* ``model.class_names`` — the label of each logit.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from torch import nn

from ..training.checkpoints import load_checkpoint
from ..training.models import model_from_checkpoint
from .preprocessing import NOT_NORMALISED_NOTE, PIXEL_SCALE, preprocessing_transform

LEGACY_NOTE = ("the checkpoint predates recorded preprocessing (pyramidkd < 0.3): resize and crop assume the usual "
               "resize + centre crop to the input size; mean/std come from the run's recipe where it is known")


def load_model(path: str | os.PathLike, *, plugins: Iterable[str] = (), host=None) -> nn.Module:
    """The model of a pyramidkd checkpoint (``.pt``) or weights file (``.safetensors``)
    in eval mode, with ``.transform``, ``.preprocessing`` and ``.class_names``.

    ``plugins`` names plugin modules to load for a model class that is neither built
    in nor installed (as a recipe's ``experiment.plugins``)."""
    path = os.fspath(path)
    checkpoint = load_checkpoint(path)
    if host is None:
        from ..host import make_plugin_host

        host = make_plugin_host(list(plugins), local_search_path=os.path.dirname(os.path.abspath(path)))
    return deployable_model(checkpoint, path, host)


def deployable_model(checkpoint: dict, path: str, host, preprocessing: dict | None = None) -> nn.Module:
    """The checkpoint's model, eval mode, with its transform attached (``preprocessing``
    overrides what the checkpoint records, e.g. a run's recipe for an old checkpoint)."""
    model = rebuilt_model(checkpoint, path, host)
    description = preprocessing or complete_preprocessing(checkpoint)
    # Plain attributes, not submodules: an exporter or torch.jit.script must not see them.
    object.__setattr__(model, "preprocessing", description)
    object.__setattr__(model, "class_names", list(description.get("class_names") or []))
    object.__setattr__(model, "transform", preprocessing_transform(description))
    return model


def rebuilt_model(checkpoint: dict, path: str, host) -> nn.Module:
    """The checkpoint's model with its weights, in eval mode, nothing attached (what an exporter gets)."""
    model, _description = model_from_checkpoint(checkpoint, path, host)
    return model.eval()


def complete_preprocessing(checkpoint: dict, known: dict | None = None) -> dict[str, Any]:
    """The checkpoint's preprocessing description; for a checkpoint written before it
    was recorded, the usual geometry for its input shape, with ``known`` (e.g. the
    mean/std a run's recipe gives, :func:`~pyramidkd.engine.training.sharing.run_preprocessing`)
    and what a ``.safetensors`` file's description holds laid over it."""
    recorded = checkpoint.get("preprocessing") or {}
    if "layout" in recorded and not known:  # written by pyramidkd >= 0.3: complete as it is
        return dict(recorded)
    shape = [int(n) for n in checkpoint["model"]["input_shape"]]
    description: dict[str, Any] = {
        "input_shape": shape, "channels": shape[0], "color": {3: "RGB", 1: "L"}.get(shape[0]), "layout": "NCHW",
        "resize": shape[1], "interpolation": "bilinear", "crop": shape[1:], "scale": None, "mean": None, "std": None,
        "class_names": [str(name) for name in checkpoint.get("class_names") or []],
    }
    description.update({k: v for k, v in {**(known or {}), **recorded}.items() if k in description or k == "note"})
    if "layout" not in recorded:
        if description["mean"] is not None and description["scale"] is None:
            description["scale"] = PIXEL_SCALE
        description["note"] = LEGACY_NOTE if description["mean"] is not None else f"{LEGACY_NOTE}; {NOT_NORMALISED_NOTE}"
    return description
