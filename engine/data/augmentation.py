"""The tensor data path: a data set held as one image tensor plus a label tensor,
batches gathered by index and augmented as whole batches with tensor ops.

Per-sample PIL decoding and transforms in a ``DataLoader`` cost more than a small
student's training step; fast CIFAR trainers hold the data on the training device
and augment whole batches there. The augmentation here is the same distribution as
torchvision's ``RandomCrop(size, padding=p)`` (zero padding, offsets uniform in
``[0, 2p]`` per axis) followed by ``RandomHorizontalFlip()`` and ``Normalize``:
the crop and the flip are one ``gather`` on the zero-padded batch, before the
normalisation, exactly as the per-sample path pads the raw image.
"""

from __future__ import annotations

from typing import Sequence

import attrs
import torch
import torch.nn.functional as F


@attrs.frozen
class Augmentation:
    """Training-time augmentation of a tensor data set (validation and test get none)."""

    crop_padding: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # random crop after zero-padding by this many pixels; 0 = off
    flip: bool = False  # random horizontal flips, probability 1/2

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip


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


def draw_augmentation(count: int, augmentation: Augmentation, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image crop offsets [count, 2] (y, x in 0..2p) and flip flags [count], drawn
    from ``generator`` (CPU), so a seed and a saved generator state replay them."""
    span = 2 * augmentation.crop_padding + 1
    offsets = torch.randint(0, span, (count, 2), generator=generator) if augmentation.crop_padding else torch.zeros(count, 2, dtype=torch.int64)
    flips = torch.randint(0, 2, (count,), generator=generator).bool() if augmentation.flip else torch.zeros(count, dtype=torch.bool)
    return offsets, flips


def augment(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop every image of ``images`` [B, C, H, W] at its own offset in the zero-padded
    batch and mirror the flagged ones: one gather over the flattened padded images."""
    return BatchAugmenter(images.shape[2], images.shape[3], padding, images.device)(images, offsets, flips)


class BatchAugmenter:
    """:func:`augment` for one image size, padding and device, with the row and
    column ranges built once rather than per batch."""

    def __init__(self, height: int, width: int, padding: int, device: torch.device | str = "cpu"):
        self.height, self.width, self.padding = height, width, padding
        self.rows = torch.arange(height, device=device)
        self.columns = torch.arange(width, device=device)
        self.mirrored = width - 1 - self.columns

    def __call__(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        if (height, width) != (self.height, self.width):
            raise ValueError(f"BatchAugmenter built for {self.height}×{self.width} images, got {height}×{width}")
        offsets, flips = offsets.to(images.device), flips.to(images.device)
        pad = self.padding
        padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
        padded_width = width + 2 * pad
        rows = offsets[:, 0:1] + self.rows  # [B, H]
        columns = torch.where(flips[:, None], self.mirrored, self.columns) + offsets[:, 1:2]  # [B, W]
        index = (rows[:, :, None] * padded_width + columns[:, None, :]).view(batch, 1, height * width)
        flat = padded.reshape(batch, channels, -1)
        return flat.gather(2, index.expand(batch, channels, height * width)).view(batch, channels, height, width)
