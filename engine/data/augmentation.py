"""Training-time augmentation of whole batches with tensor ops (the tensor pipeline).

Per-sample PIL decoding and transforms in a ``DataLoader`` cost more than a small
student's training step; fast CIFAR trainers hold the data on the training device
and augment whole batches there. The augmentation here is the same distribution as
torchvision's ``RandomCrop(size, padding=p)`` (zero padding, offsets uniform in
``[0, 2p]`` per axis) followed by ``RandomHorizontalFlip()`` and ``Normalize``:
the crop and the flip are one ``gather`` on the zero-padded batch, before the
normalisation, exactly as the per-sample path pads the raw image.
"""

from __future__ import annotations

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
