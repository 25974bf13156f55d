"""``digits``: the embedded default dataset, no download needed.

scikit-learn's bundled handwritten digits (1,797 real 8×8 grey images, 10
classes), upsampled to ``image_size`` and repeated to 3 channels, split into
train/validation/test (stratified, fixed seed).
"""

from __future__ import annotations

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from pyramidkd.engine import DataShape, DataSplits, Dataset, TensorSplit, hookimpl, non_negative, open_unit, positive

IMAGES = 1797  # in scikit-learn's copy


def stratified_split(labels: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split indices per class by ``fractions`` (the rest goes to the first part).

    Returns one index array per part: [rest, fractions[0], fractions[1], ...].
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        start = 0
        for part, fraction in enumerate(fractions, start=1):
            count = int(round(len(members) * fraction))
            parts[part].extend(members[start : start + count])
            start += count
        parts[0].extend(members[start:])
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def limit_per_class(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` indices in total, balanced over classes."""
    classes = np.unique(labels)
    per_class = max(1, limit // len(classes))
    rng = np.random.default_rng(seed)
    keep = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        keep.extend(rng.permutation(members)[:per_class])
    return np.sort(np.asarray(keep, dtype=np.int64))


@attrs.define
class DigitsParams:
    image_size: int = attrs.field(default=32, validator=positive, metadata={"help": "images are upsampled to this size"})
    val_fraction: float = attrs.field(default=0.15, validator=open_unit)
    test_fraction: float = attrs.field(default=0.15, validator=open_unit)
    split_seed: int = 0
    limit: int = attrs.field(default=0, validator=non_negative, metadata={"help": "use at most this many images (0 = all), for quick tests"})


class Digits(Dataset):
    """scikit-learn's handwritten digits (1,797 images, bundled: no download)."""

    name = "digits"
    Params = DigitsParams

    def data_shape(self, context):
        return DataShape((3, self.params.image_size, self.params.image_size), 10)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
        """(all images [N, 3, S, S] float, standardised; labels [N]; [train, val, test] indices)."""
        from sklearn.datasets import load_digits

        p = self.params
        bunch = load_digits()
        images = bunch.images.astype(np.float32) / 16.0
        labels = bunch.target.astype(np.int64)
        if p.limit:
            keep = limit_per_class(labels, p.limit, p.split_seed)
            images, labels = images[keep], labels[keep]
        tensor = torch.from_numpy(images).unsqueeze(1)
        tensor = F.interpolate(tensor, size=(p.image_size, p.image_size), mode="bilinear", align_corners=False)
        tensor = (tensor - tensor.mean()) / tensor.std()
        tensor = tensor.repeat(1, 3, 1, 1).contiguous()
        return tensor, torch.from_numpy(labels), stratified_split(labels, [p.val_fraction, p.test_fraction], p.split_seed)

    def load(self, context):
        tensor, targets, parts = self.tensors()

        def subset(indices):
            return torch.utils.data.TensorDataset(tensor[indices], targets[indices])

        size = self.params.image_size
        return DataSplits(*(subset(part) for part in parts), 10, (3, size, size), [str(i) for i in range(10)])

    def load_tensors(self, context):
        """The same float images as ``load`` (already standardised; no augmentation)."""
        tensor, targets, parts = self.tensors()
        size = self.params.image_size
        return DataSplits(*(TensorSplit(tensor[part], targets[part]) for part in parts), 10, (3, size, size), [str(i) for i in range(10)])

    def tensor_bytes(self, context):
        count = min(self.params.limit, IMAGES) if self.params.limit else IMAGES
        return count * (3 * self.params.image_size**2 * 4 + 8)


@hookimpl
def pyramidkd_register_datasets():
    return [Digits]
