"""``synthetic``: random but learnable images of any shape and class count (tests)."""

from __future__ import annotations

import attrs
import torch

from pyramidkd.engine import DataShape, DataSplits, Dataset, TensorSplit, hookimpl, non_negative, positive


@attrs.define
class SyntheticParams:
    num_classes: int = attrs.field(default=10, validator=positive)
    channels: int = attrs.field(default=3, validator=positive)
    image_size: int = attrs.field(default=32, validator=positive)
    train_size: int = attrs.field(default=256, validator=positive)
    val_size: int = attrs.field(default=64, validator=positive)
    test_size: int = attrs.field(default=64, validator=positive)
    signal: float = attrs.field(default=1.0, validator=non_negative, metadata={"help": "class-pattern strength; 0 = pure noise"})
    seed: int = 0


class Synthetic(Dataset):
    """Gaussian noise plus a fixed random pattern per class."""

    name = "synthetic"
    Params = SyntheticParams

    def data_shape(self, context):
        p = self.params
        return DataShape((p.channels, p.image_size, p.image_size), p.num_classes)

    def tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of train, validation and test, float, from the seed."""
        p = self.params
        generator = torch.Generator().manual_seed(p.seed)
        shape = (p.channels, p.image_size, p.image_size)
        prototypes = torch.randn((p.num_classes, *shape), generator=generator)

        def split(size):
            labels = torch.randint(0, p.num_classes, (size,), generator=generator)
            images = torch.randn((size, *shape), generator=generator) + p.signal * prototypes[labels]
            return images, labels

        return [split(p.train_size), split(p.val_size), split(p.test_size)]

    def splits(self, parts) -> DataSplits:
        p = self.params
        return DataSplits(*parts, p.num_classes, (p.channels, p.image_size, p.image_size), [f"class{i}" for i in range(p.num_classes)])

    def load(self, context):
        return self.splits(torch.utils.data.TensorDataset(images, labels) for images, labels in self.tensors())

    def load_tensors(self, context):
        """The same float images as ``load`` (no augmentation)."""
        return self.splits(TensorSplit(images, labels) for images, labels in self.tensors())

    def tensor_bytes(self, context):
        p = self.params
        return (p.train_size + p.val_size + p.test_size) * (p.channels * p.image_size**2 * 4 + 8)


@hookimpl
def pyramidkd_register_datasets():
    return [Synthetic]
