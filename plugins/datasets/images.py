"""What every image dataset shares: parameters, transforms, splits, and the tensor path.

Two ways to the same images. ``load`` builds per-sample views (:class:`SubsetView`:
PIL image -> resize/centre-crop -> augmentation -> tensor -> normalise, in a
``DataLoader``); ``load_tensors`` decodes the same images once through the same
PIL geometry into one uint8 tensor per split (:class:`TensorSplit`), normalised
with the same statistics, and leaves the training augmentation (padded random crop,
flip) to the batch (:class:`Augmentation`). The split indices come from one function,
:func:`split_indices`, for both.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import attrs
import numpy as np
import PIL
import torch
import torchvision
from torchvision import transforms as T

from pyramidkd.engine import Augmentation, DataSplits, DatasetError, FieldValueError, TensorSplit, non_negative, open_unit, positive
from pyramidkd.plugins.datasets.digits import limit_per_class, stratified_split

# Per-channel statistics (RGB, pixels in [0, 1]) for folders of arbitrary images.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# --- parameters shared by every image dataset ------------------------------


def _channel_stats(instance, attribute, value):
    if value is None:
        return
    if len(value) != 3:
        raise FieldValueError(f"needs 3 values (R, G, B), got {len(value)}", f"e.g. {attribute.name} = [0.5, 0.5, 0.5]")
    if attribute.name == "std" and not all(v > 0 for v in value):
        raise FieldValueError(f"must be positive, got {list(value)}", "use the per-channel standard deviations, e.g. [0.25, 0.25, 0.25]")


def _both_or_neither(params) -> None:
    if (params.mean is None) != (params.std is None):
        raise FieldValueError("mean and std go together", "set both mean and std (3 values each), or neither for the defaults")


@attrs.define
class ImageParams:
    """Options every image dataset takes: size, augmentation, normalisation, splits."""

    image_size: int | None = attrs.field(default=None, validator=positive, metadata={"help": "images are resized to this square size; default: the native size"})
    crop_padding: int | None = attrs.field(default=None, validator=non_negative, metadata={"help": "random crop after zero-padding by this many pixels (train only); 0 = off; default image_size // 8"})
    flip: bool = attrs.field(default=True, metadata={"help": "random horizontal flips (train only)"})
    mean: list[float] | None = attrs.field(default=None, validator=_channel_stats, metadata={"help": "normalisation means, R G B; default: the dataset's published ones"})
    std: list[float] | None = attrs.field(default=None, validator=_channel_stats, metadata={"help": "normalisation standard deviations, R G B"})
    val_fraction: float = attrs.field(default=0.1, validator=open_unit, metadata={"help": "fraction of the training set held out for validation (stratified)"})
    split_seed: int = attrs.field(default=0, metadata={"help": "seed of the validation split and of limit/test_limit"})
    limit: int = attrs.field(default=0, validator=non_negative, metadata={"help": "use at most this many training images (class-balanced, before the validation split); 0 = all"})
    test_limit: int = attrs.field(default=0, validator=non_negative, metadata={"help": "use at most this many test images (class-balanced); 0 = all"})

    def __attrs_post_init__(self):
        _both_or_neither(self)


# --- transforms and the per-subset view ------------------------------------


def auto_padding(image_size: int, crop_padding: int | None) -> int:
    return max(1, image_size // 8) if crop_padding is None else crop_padding


def geometry_transforms(image_size: int, native_size: int | None) -> list:
    """The resize of the short side + centre crop every split gets (none at the native size)."""
    if native_size == image_size:
        return []
    return [T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]


def build_transforms(image_size: int, native_size: int | None, params: ImageParams, mean: Sequence[float], std: Sequence[float]) -> tuple[Callable, Callable]:
    """(train transform, evaluation transform) for PIL images.

    ``native_size`` is the images' size when they all have one (CIFAR, STL); with
    ``None`` every image goes through a resize of its short side + centre crop
    (free when it already has the size)."""
    geometry = geometry_transforms(image_size, native_size)
    tail = [T.ToTensor(), T.Normalize(list(mean), list(std))]
    augment: list = []
    padding = auto_padding(image_size, params.crop_padding)
    if padding:
        augment.append(T.RandomCrop(image_size, padding=padding))
    if params.flip:
        augment.append(T.RandomHorizontalFlip())
    return T.Compose(geometry + augment + tail), T.Compose(geometry + tail)


class SubsetView(torch.utils.data.Dataset):
    """``indices`` of ``base`` (which yields ``(PIL image, label)``) through ``transform``.

    The training and validation splits are two views of one base dataset, so only
    the training view is augmented and the pixels are held once."""

    def __init__(self, base, indices: np.ndarray, transform: Callable, labels: np.ndarray):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.targets = np.asarray(labels, dtype=np.int64)[self.indices]  # this view's labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label = self.base[int(self.indices[index])]
        return self.transform(image), int(label)


def split_indices(labels: np.ndarray, test_labels: np.ndarray, params: ImageParams, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices: ``limit`` then the stratified validation split of the
    training set; ``test_limit`` of the test set."""
    pool = limit_per_class(labels, params.limit, params.split_seed) if params.limit else np.arange(len(labels))
    rest, val = stratified_split(labels[pool], [params.val_fraction], params.split_seed)
    train, val = pool[rest], pool[val]
    test = limit_per_class(test_labels, params.test_limit, params.split_seed) if params.test_limit else np.arange(len(test_labels))
    for name, part in (("training", train), ("validation", val), ("test", test)):
        if len(part) == 0:
            raise DatasetError(
                f"{source}: the {name} split is empty (train set {len(labels)} images, limit {params.limit}, val_fraction {params.val_fraction})",
                key="dataset",
                fix="raise limit / test_limit (at least a few images per class) or val_fraction",
            )
    return train, val, test


def make_splits(base_train, train_labels, base_test, test_labels, *, params: ImageParams, image_size: int, native_size: int | None,
                mean, std, class_names: list[str], source: str) -> DataSplits:
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    train, val, test = split_indices(train_labels, test_labels, params, source)
    train_tf, eval_tf = build_transforms(image_size, native_size, params, mean, std)
    return DataSplits(
        train=SubsetView(base_train, train, train_tf, train_labels),
        val=SubsetView(base_train, val, eval_tf, train_labels),
        test=SubsetView(base_test, test, eval_tf, test_labels),
        num_classes=len(class_names),
        input_shape=(3, image_size, image_size),
        class_names=list(class_names),
    )


def check_labels(labels: np.ndarray, num_classes: int, path: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"labels out of range in {path}: found {int(labels.min())}..{int(labels.max())}, expected 0..{num_classes - 1}",
            fix="the file is corrupt or in another format; re-download it",
        )


# --- the tensor path ---------------------------------------------------------------


def augmentation_for(params: ImageParams, image_size: int) -> Augmentation:
    """The training augmentation ``build_transforms`` applies per sample, for batches."""
    return Augmentation(crop_padding=auto_padding(image_size, params.crop_padding), flip=bool(params.flip))


def pil_decoder(image_size: int, native_size: int | None, read: Callable[[object], object]) -> Callable[[object], np.ndarray]:
    """``item -> [H, W, 3] uint8`` pixels: ``read(item)`` (a PIL RGB image) through the
    same resize/centre crop as :func:`build_transforms`, before ``ToTensor``."""
    geometry = T.Compose(geometry_transforms(image_size, native_size))

    def decode(item) -> np.ndarray:
        image = read(item)
        # Resize and CenterCrop return an image of the target size unchanged: skip their overhead
        return np.asarray(image if image.size == (image_size, image_size) else geometry(image))

    return decode


def pixel_stats(images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """[[mean], [std]] per channel (float64) of uint8 images [N, C, H, W], scaled as
    ``ToTensor`` scales them (float32 / 255), summed in float64."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros(images.shape[1], dtype=torch.float64)
    for start in range(0, len(images), chunk):
        pixels = images[start : start + chunk].float().div(255).double().transpose(0, 1).flatten(1)
        total += pixels.sum(1)
        squares += (pixels * pixels).sum(1)
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    return torch.stack([mean, (squares / count - mean * mean).clamp_min(1e-12).sqrt()])


def selection_digest(*parts) -> str:
    """A short digest of index arrays or path lists (part of a decoded-cache key)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(np.asarray(part, dtype=np.int64).tobytes() if not isinstance(part, list) else "\0".join(part).encode())
        digest.update(b"|")
    return digest.hexdigest()[:32]


def decoder_versions() -> dict:
    """Library versions that decide decoded pixels (a new libjpeg can round differently)."""
    return {"pillow": PIL.__version__, "torchvision": torchvision.__version__}


def pool_tensor_splits(pool_images: torch.Tensor, pool: np.ndarray, train: np.ndarray, val: np.ndarray, train_labels: np.ndarray,
                       test_images: torch.Tensor, test: np.ndarray, test_labels: np.ndarray, *, params: ImageParams, image_size: int,
                       mean, std, class_names: list[str]) -> DataSplits:
    """Tensor splits from the decoded ``pool`` (sorted training-set indices holding
    ``train`` and ``val``) and the decoded ``test`` images, in ``load``'s order."""
    def take(indices: np.ndarray) -> torch.Tensor:
        return pool_images[torch.from_numpy(np.searchsorted(pool, indices))]

    def split(images: torch.Tensor, labels: np.ndarray) -> TensorSplit:
        return TensorSplit(images, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)), mean, std)

    return DataSplits(
        train=split(take(train), train_labels[train]),
        val=split(take(val), train_labels[val]),
        test=split(test_images, test_labels[test]),
        num_classes=len(class_names),
        input_shape=(3, image_size, image_size),
        class_names=list(class_names),
        augmentation=augmentation_for(params, image_size),
    )


def estimated_bytes(train_count: int, test_count: int, params: ImageParams, image_size: int, extra: int = 0) -> int:
    """uint8 pixels + int64 labels of the images ``limit``/``test_limit`` keep."""
    kept = (min(train_count, params.limit) if params.limit else train_count) + (min(test_count, params.test_limit) if params.test_limit else test_count) + extra
    return kept * (3 * image_size * image_size + 8)
