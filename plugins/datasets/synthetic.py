"""``synthetic``: random but learnable images of any shape and class count (tests)."""

from __future__ import annotations

import attrs
import torch

from pyramidkd.engine import DataShape, DataSplits, Dataset, hookimpl, non_negative, positive


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

    def load(self, context):
        p = self.params
        generator = torch.Generator().manual_seed(p.seed)
        shape = (p.channels, p.image_size, p.image_size)
        prototypes = torch.randn((p.num_classes, *shape), generator=generator)

        def split(size):
            labels = torch.randint(0, p.num_classes, (size,), generator=generator)
            images = torch.randn((size, *shape), generator=generator) + p.signal * prototypes[labels]
            return torch.utils.data.TensorDataset(images, labels)

        return DataSplits(split(p.train_size), split(p.val_size), split(p.test_size), p.num_classes, shape,
                          [f"class{i}" for i in range(p.num_classes)])


@hookimpl
def pyramidkd_register_datasets():
    return [Synthetic]
