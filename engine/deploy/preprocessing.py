"""How raw images become a model's inputs: described once, where a checkpoint is
written, and carried by every file made from it.

:func:`describe_preprocessing` reads it off the run's loaded data (the test split's
own transform, or a tensor split's statistics), so it says what evaluation did, not
what a recipe hoped for. The description is plain JSON::

    {"input_shape": [3, 32, 32], "channels": 3, "color": "RGB", "layout": "NCHW",
     "resize": 32, "interpolation": "bilinear", "crop": [32, 32],
     "scale": 0.00392156862745098, "mean": [...], "std": [...], "class_names": [...]}

``resize`` is the size of the image's short side after resizing (``null``: none),
``crop`` the centre crop (height, width), ``scale`` what 8-bit pixels are
multiplied by before ``(x - mean) / std``. A data set that hands the model float
tensors it made itself (``digits``, ``synthetic``) has ``scale``, ``mean`` and
``std`` ``null`` and a ``note``: its inputs are already on the model's scale.

:func:`preprocessing_transform` turns a description into a torchvision transform
(PIL image or uint8 tensor -> normalised float tensor). This module imports no
other part of the engine, so the checkpoint writer and a bare ``load_model`` can
both use it.
"""

from __future__ import annotations

from typing import Any

PIXEL_SCALE = 1.0 / 255.0
NOT_NORMALISED_NOTE = ("the data set gives the model float tensors it makes itself (no 8-bit pixels, no mean/std): "
                       "prepare inputs as its dataset plugin does")


def describe_preprocessing(data) -> dict[str, Any]:
    """The description of ``data`` (a :class:`~pyramidkd.engine.components.DataSplits`),
    read from its test split: what turned raw images into the tensors it was evaluated on."""
    shape = [int(n) for n in data.input_shape]
    description: dict[str, Any] = {
        "input_shape": shape,
        "channels": shape[0],
        "color": {3: "RGB", 1: "L"}.get(shape[0]),
        "layout": "NCHW",
        "resize": None,
        "interpolation": None,
        "crop": None,
        "scale": None,
        "mean": None,
        "std": None,
        "class_names": [str(name) for name in getattr(data, "class_names", None) or []],
    }
    split = getattr(data, "test", None)
    transform = getattr(split, "transform", None)
    if transform is not None:
        description.update(_from_transforms(transform))
    elif getattr(split, "mean", None) is not None and _holds_pixels(split):
        # a tensor split of uint8 pixels: decoded through the same resize + centre crop
        # as the per-sample path (an identity at the images' own size)
        description.update({"resize": shape[1], "interpolation": "bilinear", "crop": shape[1:], "scale": PIXEL_SCALE,
                            "mean": list(split.mean), "std": list(split.std)})
    elif _holds_pixels(split):
        description.update({"scale": PIXEL_SCALE})
    if description["scale"] is None:
        description["note"] = NOT_NORMALISED_NOTE
    return description


def _holds_pixels(split) -> bool:
    images = getattr(split, "images", None)
    return images is not None and str(getattr(images, "dtype", "")) == "torch.uint8"


def _from_transforms(transform) -> dict[str, Any]:
    """Resize / CenterCrop / ToTensor / Normalize read off a (torchvision) Compose."""
    found: dict[str, Any] = {}
    unknown = []
    for step in getattr(transform, "transforms", [transform]):
        kind = type(step).__name__
        if kind == "Resize":
            size = step.size if isinstance(step.size, int) else list(step.size)
            found["resize"] = size[0] if isinstance(size, list) and len(size) == 1 else size
            found["interpolation"] = getattr(step.interpolation, "value", str(step.interpolation))
        elif kind == "CenterCrop":
            found["crop"] = [int(n) for n in step.size]
        elif kind in ("ToTensor", "PILToTensor", "ToImage", "ToDtype", "ConvertImageDtype"):
            found["scale"] = PIXEL_SCALE if kind != "PILToTensor" else found.get("scale")
        elif kind == "Normalize":
            found["mean"] = [float(v) for v in step.mean]
            found["std"] = [float(v) for v in step.std]
        else:
            unknown.append(kind)
    if unknown:
        found["other_transforms"] = unknown  # a consumer must reproduce these too
    return found


def normalisation(description: dict) -> tuple[list[float], list[float]] | None:
    """(mean, std) of a description, or None where the inputs are not normalised pixels."""
    if description.get("mean") is None or description.get("std") is None:
        return None
    return list(description["mean"]), list(description["std"])


class Preprocess:
    """``transform(image)``: a PIL image or a uint8 tensor ``[C, H, W]`` (or a batch
    ``[N, C, H, W]``) -> the model's normalised float input. ``compose`` is the
    torchvision ``v2.Compose`` doing it (colour, resize of the short side, centre crop,
    scale, normalise); ``description`` the JSON it was built from. (A plain object, not
    an ``nn.Module``: attached to a model, exporters and ``torch.jit.script`` skip it.)"""

    def __init__(self, description: dict):
        self.description = dict(description)
        self.compose = _compose(self.description)

    def __call__(self, image):
        return self.compose(image)

    def __repr__(self) -> str:
        return f"Preprocess({self.compose!r})"


def preprocessing_transform(description: dict) -> Preprocess:
    """The :class:`Preprocess` of a description."""
    return Preprocess(description)


def _compose(description: dict):
    from torchvision.transforms import v2

    import torch

    steps: list = []
    if description.get("color") == "RGB":
        steps.append(v2.RGB())
    elif description.get("color") == "L":
        steps.append(v2.Grayscale(1))
    resize = description.get("resize")
    if resize is not None:
        mode = v2.InterpolationMode(description.get("interpolation") or "bilinear")
        steps.append(v2.Resize(resize, interpolation=mode, antialias=True))
    crop = description.get("crop")
    if crop is not None:
        steps.append(v2.CenterCrop(list(crop)))
    steps.append(v2.ToImage())
    steps.append(v2.ToDtype(torch.float32, scale=description.get("scale") is not None))
    stats = normalisation(description)
    if stats is not None:
        steps.append(v2.Normalize(*stats))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)
