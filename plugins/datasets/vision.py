"""``cifar10``, ``cifar100``, ``stl10``: the standard image datasets, read by torchvision.

The pixels are read by torchvision's own readers (``torchvision.datasets.CIFAR10``,
``CIFAR100``, ``STL10``), from the files their download produces:

* CIFAR-10:  ``<root>/cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
* CIFAR-100: ``<root>/cifar-100-python/`` (``train``, ``test``, ``meta``; the 100 fine labels)
* STL-10:    ``<root>/stl10_binary/`` (``train_X.bin``, ``train_y.bin``, ``test_X.bin``,
  ``test_y.bin``, ``class_names.txt``; ``fold_indices.txt`` for ``fold``). The labelled
  splits only (train 5,000 / test 8,000); the 100,000 unlabelled images are not used.

Integrity: torchvision checks the md5 of every file on each construction and fails
with "Dataset not found or corrupted". This plugin does that check itself, once per
load, with torchvision's own md5 table (``train_list``/``test_list``/``meta``) and
``torchvision.datasets.utils.calculate_md5``, so that a missing or corrupt file is
reported by path with a fix; it then constructs torchvision's reader classes with
their (now redundant) integrity check switched off (``_Checked*`` below). Files that
are not the published ones (re-pickled, subsets, the tiny files of the tests) load
with ``verify_checksums = false``: only the md5 comparison is skipped; the reading
code is torchvision's in both cases.

Splits: a validation split is carved from the official training set (stratified,
``val_fraction``, seeded by ``split_seed``); the official test set is the test split.
Augmentation (random crop with ``crop_padding``, horizontal ``flip``) applies to the
training split only; validation and test images go through resize → tensor →
normalise. Both views share one in-memory copy of the pixels (:class:`SubsetView`).

The tensor path (``load_tensors``) gives the same splits as uint8 tensors, the
augmentation left to the batch: at the native size straight from the readers'
arrays (no PIL); at another ``image_size`` every image goes through ``load``'s PIL
resize + centre crop once, kept in the decoded-image cache (``<cache>/decoded/``,
keyed by the data files, the size and the selection).
"""

from __future__ import annotations

import logging
import os
import pickle

import attrs
import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100, STL10
from torchvision.datasets.utils import calculate_md5, download_and_extract_archive

from pyramidkd.engine import DataShape, DataSplits, Dataset, DatasetError, between, cached_tensors, decode_images, hookimpl
from pyramidkd.plugins.datasets.images import (  # noqa: F401  (some re-exported: they lived here before images.py)
    IMAGENET_STATS,
    ImageParams,
    SubsetView,
    auto_padding,
    build_transforms,
    check_labels,
    decoder_versions,
    estimated_bytes,
    make_splits,
    pil_decoder,
    pool_tensor_splits,
    selection_digest,
    split_indices,
)

log = logging.getLogger("pyramidkd")

# Published per-channel statistics of the training sets (RGB, pixels in [0, 1]).
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
STL10_STATS = ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))


@attrs.define
class TorchvisionParams(ImageParams):
    root: str = attrs.field(default="", metadata={"help": "folder holding the dataset's folder (relative to the recipe); default <cache>/datasets"})
    download: bool = attrs.field(default=False, metadata={"help": "download with torchvision when the files are missing (needs internet)"})
    verify_checksums: bool = attrs.field(default=True, metadata={"help": "compare the files' md5 with the published ones; false for files you made yourself"})


@attrs.define
class STL10Params(TorchvisionParams):
    fold: int | None = attrs.field(default=None, validator=between(0, 9), metadata={"help": "train on one of the 10 standard 1,000-image folds (0-9); default all 5,000"})


# --- torchvision's readers, integrity checked by the plugin ------------------


class _FilesChecked:
    """torchvision's reader with its integrity check off: the plugin has checked the files (and md5s)."""

    def _check_integrity(self) -> bool:
        return True


class _CheckedCIFAR10(_FilesChecked, CIFAR10):
    meta = {**CIFAR10.meta, "md5": None}  # check_integrity(path, None): the file exists


class _CheckedCIFAR100(_FilesChecked, CIFAR100):
    meta = {**CIFAR100.meta, "md5": None}


class _CheckedSTL10(_FilesChecked, STL10):
    """(torchvision would also require, and md5, the 2.6 GB unlabelled file.)"""


def _md5_table(cls) -> dict[str, str]:
    table = {name: md5 for name, md5 in list(cls.train_list) + list(cls.test_list)}
    meta = getattr(cls, "meta", None)
    if isinstance(meta, dict):
        table[meta["filename"]] = meta["md5"]
    return table


class TorchvisionDataset(Dataset):
    """Shared by ``cifar10``, ``cifar100`` and ``stl10``."""

    Params = TorchvisionParams
    title: str = ""
    reader: type = CIFAR10  # torchvision's class: folder, url, md5s
    checked_reader: type = _CheckedCIFAR10
    native_size: int = 32
    num_classes: int = 10
    stats: tuple = CIFAR10_STATS
    data_description: str = ""

    def data_shape(self, context) -> DataShape:
        size = self.params.image_size or self.native_size
        return DataShape((3, size, size), self.num_classes)

    # -- files -------------------------------------------------------------
    def root(self, context) -> str:
        root = self.params.root or os.path.join(context.cache_dir, "datasets")
        return context.resolve_path(root)

    def folder(self, context) -> str:
        return os.path.join(self.root(context), self.reader.base_folder)

    def required_files(self) -> list[str]:
        raise NotImplementedError

    def missing_files(self, context) -> list[str]:
        folder = self.folder(context)
        return [os.path.join(folder, name) for name in self.required_files() if not os.path.isfile(os.path.join(folder, name))]

    def not_found(self, context, missing: list[str]) -> DatasetError:
        root = self.root(context)
        where = f"{missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        folder_note = "" if os.path.isdir(root) else f" (the folder {root} does not exist)"
        return DatasetError(
            f"{self.title} not found: missing {where}{folder_note}",
            key="dataset.root",
            fix=f"set download = true on a machine with internet, or place {self.data_description} under {root} "
                f"(it is {self.reader.url}, extracted), or point root at the folder that holds {self.reader.base_folder}/",
        )

    def check(self, context) -> None:
        if self.params.download:
            return
        missing = self.missing_files(context)
        if missing:
            raise self.not_found(context, missing)

    def ensure_files(self, context) -> None:
        missing = self.missing_files(context)
        if missing and self.params.download:
            root = self.root(context)
            log.info("downloading %s to %s", self.title, root)
            try:
                download_and_extract_archive(self.reader.url, root, filename=self.reader.filename, md5=self.reader.tgz_md5)
            except Exception as error:  # network errors come in many types (URLError, HTTPError, OSError, RuntimeError)
                raise DatasetError(
                    f"downloading {self.title} from {self.reader.url} failed: {error}",
                    key="dataset.download",
                    fix=f"check the internet connection, or download {self.reader.url} by hand and extract it under {root}",
                ) from None
            missing = self.missing_files(context)
        if missing:
            raise self.not_found(context, missing)
        if self.params.verify_checksums:
            table = _md5_table(self.reader)
            folder = self.folder(context)
            for name in self.required_files():
                expected = table.get(name)
                if expected is None:
                    continue
                path = os.path.join(folder, name)
                actual = calculate_md5(path)
                if actual != expected:
                    raise DatasetError(
                        f"{self.title} file is corrupt or not the published version: {path} (md5 {actual}, expected {expected})",
                        key="dataset.root",
                        fix="delete it and download again (download = true), or set verify_checksums = false if you made this file yourself",
                    )

    # -- reading -------------------------------------------------------------
    def read(self, context, split: str):
        """torchvision's reader for ``split`` ("train" or "test"), without transform."""
        raise NotImplementedError

    def read_checked(self, context, split: str):
        try:
            return self.read(context, split)
        except DatasetError:
            raise
        except Exception as error:  # a truncated or foreign file fails deep in pickle/numpy
            path = self.diagnose(context, split) or self.folder(context)
            raise DatasetError(
                f"cannot read {self.title} {split} data from {path}: {type(error).__name__}: {error}",
                key="dataset.root",
                fix="the file is corrupt or not in the expected format; delete it and download again (download = true)",
            ) from None

    def diagnose(self, context, split: str) -> str | None:
        """The first file of ``split`` that cannot be read (called after a failure)."""
        return None

    def read_sets(self, context) -> tuple:
        """(train reader, test reader, train labels, test labels, class names), checked."""
        self.ensure_files(context)
        train = self.read_checked(context, "train")
        test = self.read_checked(context, "test")
        classes = self.class_names(train)
        train_labels, test_labels = self.labels(train), self.labels(test)
        check_labels(train_labels, len(classes), self.label_file(context, "train"))
        check_labels(test_labels, len(classes), self.label_file(context, "test"))
        return train, test, train_labels, test_labels, classes

    def load(self, context) -> DataSplits:
        train, test, train_labels, test_labels, classes = self.read_sets(context)
        p = self.params
        image_size = p.image_size or self.native_size
        mean, std = (p.mean, p.std) if p.mean is not None else self.stats
        return make_splits(train, train_labels, test, test_labels, params=p, image_size=image_size, native_size=self.native_size,
                           mean=mean, std=std, class_names=classes, source=self.title)

    # -- the tensor path -----------------------------------------------------
    def load_tensors(self, context) -> DataSplits:
        train, test, train_labels, test_labels, classes = self.read_sets(context)
        p = self.params
        image_size = p.image_size or self.native_size
        mean, std = (p.mean, p.std) if p.mean is not None else self.stats
        train_indices, val_indices, test_indices = split_indices(train_labels, test_labels, p, self.title)
        pool = np.union1d(train_indices, val_indices)  # sorted: decoded once, split after
        if image_size == self.native_size:  # the readers hold the pixels already: no PIL, no cache
            pool_images, test_images = self.pixels(train, pool), self.pixels(test, test_indices)
        else:
            pool_images, test_images = self.resized(context, (train, pool), (test, test_indices), image_size)
        return pool_tensor_splits(pool_images, pool, train_indices, val_indices, train_labels, test_images, test_indices, test_labels,
                                  params=p, image_size=image_size, mean=mean, std=std, class_names=classes)

    def pixels(self, base, indices: np.ndarray) -> torch.Tensor:
        """uint8 [N, 3, H, W] straight from the reader's array (CIFAR holds [N, H, W, 3])."""
        return torch.from_numpy(np.ascontiguousarray(base.data[indices].transpose(0, 3, 1, 2)))

    def resized(self, context, train: tuple, test: tuple, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected images through ``load``'s PIL resize + centre crop, decoded once
        into the decoded-image cache (keyed by the files, the size and the selection)."""
        shape = (3, image_size, image_size)

        def decode() -> dict:
            return {part: decode_images(indices, pil_decoder(image_size, self.native_size, lambda i, base=base: base[int(i)][0]), shape)
                    for part, (base, indices) in (("pool", train), ("test", test))}

        folder = self.folder(context)
        key = {"dataset": self.name, "folder": os.path.realpath(folder), "image_size": image_size, "fold": getattr(self.params, "fold", None),
               "selection": selection_digest(train[1], test[1]), **decoder_versions()}
        sources = [os.path.join(folder, name) for name in self.required_files()]
        tensors = cached_tensors(context.cache_dir, f"{self.name}-{image_size}px", key, sources, decode)
        return tensors["pool"], tensors["test"]

    def tensor_bytes(self, context) -> int | None:
        if self.missing_files(context):
            return None
        train_count, test_count = self.image_counts(self.folder(context))
        return estimated_bytes(train_count, test_count, self.params, self.params.image_size or self.native_size)

    def image_counts(self, folder: str) -> tuple[int, int]:
        """(training images, test images), estimated from the file sizes."""
        raise NotImplementedError

    def class_names(self, base) -> list[str]:
        return list(base.classes)

    def labels(self, base) -> np.ndarray:
        return np.asarray(base.targets, dtype=np.int64)

    def label_file(self, context, split: str) -> str:
        return self.folder(context)


class _CIFAR(TorchvisionDataset):
    def required_files(self) -> list[str]:
        return [name for name, _ in self.reader.train_list + self.reader.test_list] + [self.reader.meta["filename"]]

    def read(self, context, split):
        return self.checked_reader(self.root(context), train=split == "train", download=False)

    def image_counts(self, folder):
        image = 3 * 32 * 32  # a pickled row is these bytes plus a few for its label and file name
        return tuple(sum(os.path.getsize(os.path.join(folder, n)) for n, _ in files) // image
                     for files in (self.reader.train_list, self.reader.test_list))

    def diagnose(self, context, split):
        names = [n for n, _ in (self.reader.train_list if split == "train" else self.reader.test_list)] + [self.reader.meta["filename"]]
        for name in names:
            path = os.path.join(self.folder(context), name)
            try:
                with open(path, "rb") as handle:
                    entry = pickle.load(handle, encoding="latin1")
                if name != self.reader.meta["filename"]:
                    data = np.asarray(entry["data"])
                    labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
                    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
                        return path
                elif self.reader.meta["key"] not in entry:
                    return path
            except Exception:
                return path
        return None


class Cifar10(_CIFAR):
    """CIFAR-10 (60,000 32×32 images, 10 classes), torchvision's reader."""

    name = "cifar10"
    title = "CIFAR-10"
    reader = CIFAR10
    checked_reader = _CheckedCIFAR10
    stats = CIFAR10_STATS
    data_description = "the CIFAR-10 python version (cifar-10-batches-py/)"


class Cifar100(_CIFAR):
    """CIFAR-100 (60,000 32×32 images, 100 fine classes), torchvision's reader."""

    name = "cifar100"
    title = "CIFAR-100"
    reader = CIFAR100
    checked_reader = _CheckedCIFAR100
    num_classes = 100
    stats = CIFAR100_STATS
    data_description = "the CIFAR-100 python version (cifar-100-python/)"


STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


class Stl10(TorchvisionDataset):
    """STL-10 labelled splits (train 5,000 / test 8,000, 96×96, 10 classes), torchvision's reader."""

    name = "stl10"
    title = "STL-10"
    Params = STL10Params
    reader = STL10
    checked_reader = _CheckedSTL10
    native_size = 96
    stats = STL10_STATS
    data_description = "the STL-10 binary version (stl10_binary/)"

    def required_files(self) -> list[str]:
        names = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
        if self.params.fold is not None:
            names.append(self.reader.folds_list_file)
        return names

    def read(self, context, split):
        fold = self.params.fold if split == "train" else None
        base = self.checked_reader(self.root(context), split=split, folds=fold, download=False)
        if len(base.labels) != len(base.data):
            raise DatasetError(
                f"STL-10 {split}: {len(base.data)} images but {len(base.labels)} labels in {self.label_file(context, split)}",
                fix="the files are corrupt or truncated; delete them and download again (download = true)",
            )
        return base

    def pixels(self, base, indices):
        return torch.from_numpy(np.ascontiguousarray(base.data[indices]))  # STL10's reader holds [N, 3, H, W]

    def image_counts(self, folder):
        train, test = (os.path.getsize(os.path.join(folder, f"{split}_X.bin")) // (3 * 96 * 96) for split in ("train", "test"))
        return (train // 5 if self.params.fold is not None else train), test  # a fold: 1,000 of the 5,000

    def diagnose(self, context, split):
        image_bytes = 3 * 96 * 96
        path = os.path.join(self.folder(context), f"{split}_X.bin")
        if os.path.getsize(path) % image_bytes:
            return path
        if self.params.fold is not None and split == "train":
            return os.path.join(self.folder(context), self.reader.folds_list_file)
        return None

    def class_names(self, base) -> list[str]:
        names = list(getattr(base, "classes", None) or [])
        return names if len(names) == 10 else list(STL10_CLASSES)

    def labels(self, base) -> np.ndarray:
        return np.asarray(base.labels, dtype=np.int64)

    def label_file(self, context, split: str) -> str:
        return os.path.join(self.folder(context), f"{split}_y.bin")


@hookimpl
def pyramidkd_register_datasets():
    return [Cifar10, Cifar100, Stl10]
