"""A split held as tensors: one image tensor plus a label tensor, and the
normalisation of uint8 pixels as one fused multiply-add (:class:`Normalizer`).

Data sets offer these through ``Dataset.load_tensors`` (the tensor pipeline,
:mod:`.pipeline`); :mod:`.batches` gathers batches from them by index.
"""

from __future__ import annotations

from typing import Sequence

import torch


class TensorSplit(torch.utils.data.Dataset):
    """One split held as tensors: ``images`` [N, C, H, W] (uint8 pixels in 0..255, or
    float values already on the model's scale) and ``labels`` [N] (int64).

    ``mean``/``std`` (one value per channel) normalise uint8 pixels after scaling
    them to [0, 1]; float images are used as they are. Indexing gives one normalised,
    un-augmented sample, so code written for ordinary data sets still works.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        if images.ndim != 4:
            raise ValueError(f"TensorSplit images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"TensorSplit needs one label per image: {len(images)} images, labels of shape {tuple(labels.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"TensorSplit images must be uint8 or floating point, got {images.dtype}")
        if (mean is None) != (std is None):
            raise ValueError("TensorSplit: give both mean and std, or neither")
        if mean is not None and (len(mean) != images.shape[1] or len(std) != images.shape[1]):
            raise ValueError(f"TensorSplit: mean and std need one value per channel ({images.shape[1]})")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = normalize(self.images[index : index + 1], self.mean, self.std)[0]
        return image, int(self.labels[index])

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.labels.numel() * 8

    def to(self, device: torch.device) -> "TensorSplit":
        if self.images.device == device:
            return self
        return TensorSplit(self.images.to(device), self.labels.to(device), self.mean, self.std)


class Normalizer:
    """uint8 pixels -> ``(x / 255 - mean) / std`` per channel as one fused
    multiply-add (scale and shift precomputed on the device); float images pass
    through (float64 becomes float32)."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None, device: torch.device | str = "cpu"):
        channels = 1 if mean is None else len(mean)
        mean = mean if mean is not None else (0.0,)
        std = std if std is not None else (1.0,)
        shape = (1, channels, 1, 1)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device).view(shape)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=device).view(shape)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images.float() if images.dtype == torch.float64 else images
        return torch.addcmul(self.shift, images, self.scale)


def normalize(images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1] -> (x - mean) / std per channel; float images pass."""
    return Normalizer(mean, std, images.device)(images)
