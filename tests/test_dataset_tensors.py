"""``load_tensors`` gives the same images, labels and splits as ``load``, for every
built-in dataset, on tiny files in each real on-disk format (the writers of
test_datasets.py): every validation and test sample of the tensor splits
(``TensorSplit.__getitem__``: normalised, un-augmented) equals ``load``'s, and every
training sample equals ``load``'s with its augmentation switched off; the augmentation
moves to ``DataSplits.augmentation``. ``tensor_bytes`` is within a factor of 2 of
the tensors' real size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyramidkd.engine import Augmentation, DatasetContext, TensorSplit
from pyramidkd.plugins.datasets.digits import Digits, DigitsParams
from pyramidkd.plugins.datasets.imagefolder import ImageFolder, ImageFolderParams
from pyramidkd.plugins.datasets.synthetic import Synthetic, SyntheticParams
from pyramidkd.plugins.datasets.vision import Cifar10, Cifar100, Stl10, STL10Params, TorchvisionParams
from test_datasets import write_cifar10, write_cifar10_jpeg_archive, write_cifar100, write_stl10, write_tree

NO_AUGMENTATION = {"crop_padding": 0, "flip": False}


@pytest.fixture
def context(tmp_path):
    return DatasetContext(seed=0, recipe_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def assert_same_samples(expected, actual: TensorSplit, atol: float = 1e-6) -> None:
    assert isinstance(actual, TensorSplit) and len(actual) == len(expected)
    for index in range(len(expected)):
        (image, label), (tensor_image, tensor_label) = expected[index], actual[index]
        assert tensor_label == label, f"sample {index}: label {tensor_label}, load gives {label}"
        assert tensor_image.dtype == torch.float32 and tensor_image.shape == image.shape
        torch.testing.assert_close(tensor_image, image, atol=atol, rtol=0, msg=lambda m: f"sample {index}: {m}")


def assert_tensor_path_matches(dataset_cls, params_cls, context, **params) -> object:
    """load vs load_tensors with ``params`` (augmentation as given), and ``load`` with the
    augmentation off for the training split; returns the tensor splits."""
    tensors = dataset_cls(params_cls(**params)).load_tensors(context)
    loaded = dataset_cls(params_cls(**params)).load(context)
    plain = dataset_cls(params_cls(**{**params, **NO_AUGMENTATION})).load(context)
    assert (tensors.num_classes, tensors.input_shape, tensors.class_names) == (loaded.num_classes, loaded.input_shape, loaded.class_names)
    assert_same_samples(loaded.val, tensors.val)
    assert_same_samples(loaded.test, tensors.test)
    assert_same_samples(plain.train, tensors.train)
    for split in (tensors.train, tensors.val, tensors.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == tensors.input_shape
    estimate = dataset_cls(params_cls(**params)).tensor_bytes(context)
    actual = sum(split.nbytes for split in (tensors.train, tensors.val, tensors.test))
    assert actual / 2 <= estimate <= actual * 2, (estimate, actual)
    return tensors


def test_cifar10_native_size(tmp_path, context):
    write_cifar10(tmp_path / "data", train_per_class=6)
    tensors = assert_tensor_path_matches(Cifar10, TorchvisionParams, context, root="data", verify_checksums=False, val_fraction=1 / 3)
    assert tensors.augmentation == Augmentation(crop_padding=4, flip=True)  # the defaults: image_size // 8, flips
    assert (len(tensors.train), len(tensors.val), len(tensors.test)) == (40, 20, 20)
    assert not (tmp_path / "cache").exists()  # native size: read from the reader's arrays, nothing to cache


def test_cifar10_resized_limited_custom_stats(tmp_path, context):
    write_cifar10(tmp_path / "data", train_per_class=6)
    tensors = assert_tensor_path_matches(Cifar10, TorchvisionParams, context, root="data", verify_checksums=False, image_size=40, val_fraction=0.25,
                                         limit=40, test_limit=10, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], crop_padding=3, flip=False)
    assert tensors.augmentation == Augmentation(crop_padding=3, flip=False)
    assert (len(tensors.train), len(tensors.val), len(tensors.test)) == (30, 10, 10)
    assert tensors.train.mean == pytest.approx((0.5, 0.4, 0.3)) and tensors.train.std == pytest.approx((0.2, 0.25, 0.3))
    assert len(list((tmp_path / "cache" / "decoded").glob("cifar10-40px-*.tensors"))) == 1  # the resize is cached


def test_cifar100(tmp_path, context):
    write_cifar100(tmp_path / "data")
    tensors = assert_tensor_path_matches(Cifar100, TorchvisionParams, context, root="data", verify_checksums=False, val_fraction=0.25)
    assert set(tensors.val.labels.tolist()) == {0, 7, 14, 21, 28}


def test_stl10_native_fold_and_resized(tmp_path, context):
    write_stl10(tmp_path / "data")
    common = {"root": "data", "verify_checksums": False, "val_fraction": 0.5}
    assert_tensor_path_matches(Stl10, STL10Params, context, **common)
    folded = assert_tensor_path_matches(Stl10, STL10Params, context, **common, fold=3)
    assert len(folded.train) + len(folded.val) == 18
    small = assert_tensor_path_matches(Stl10, STL10Params, context, **common, image_size=24, flip=False)
    assert small.input_shape == (3, 24, 24) and small.augmentation == Augmentation(crop_padding=3, flip=False)


def test_imagefolder_tree_png_and_jpeg(tmp_path, context):
    write_tree(tmp_path / "tree", size=12)
    tensors = assert_tensor_path_matches(ImageFolder, ImageFolderParams, context, root="tree", val_fraction=1 / 3)
    assert tensors.input_shape == (3, 12, 12) and tensors.class_names == ["ant", "bee", "cat"]
    assert tensors.augmentation == Augmentation(crop_padding=1, flip=True)
    # a resize of the short side + centre crop, limited selections
    assert_tensor_path_matches(ImageFolder, ImageFolderParams, context, root="tree", val_fraction=1 / 3, image_size=8, limit=9, test_limit=6)
    assert_tensor_path_matches(ImageFolder, ImageFolderParams, context, root="tree", val_fraction=1 / 3, image_size=20)


def test_imagefolder_non_square_images(tmp_path, context):
    from PIL import Image

    for split, count in (("train", 6), ("test", 2)):
        for label, name in enumerate(("a", "b")):
            folder = tmp_path / "tree" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.random.default_rng(10 * label + i).integers(0, 256, (10 + i, 14, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    assert_tensor_path_matches(ImageFolder, ImageFolderParams, context, root="tree", val_fraction=0.5, image_size=9)


def test_imagefolder_val_folder_and_computed_stats(tmp_path, context):
    write_tree(tmp_path / "tree", splits={"train": 4, "val": 2, "test": 2})
    params = {"root": "tree", "val_split": "val", "normalization": "computed", "limit": 9}
    tensors = assert_tensor_path_matches(ImageFolder, ImageFolderParams, context, **params)
    loaded = ImageFolder(ImageFolderParams(**params)).load(context)
    normalize = loaded.val.transform.transforms[-1]
    assert tensors.val.mean == pytest.approx(tuple(normalize.mean), abs=1e-9)
    assert tensors.val.std == pytest.approx(tuple(normalize.std), abs=1e-9)
    assert (len(tensors.train), len(tensors.val), len(tensors.test)) == (9, 6, 6)


def test_imagefolder_archive(tmp_path, context):
    write_cifar10_jpeg_archive(tmp_path / "cifar10-jpeg.tar.gz")
    tensors = assert_tensor_path_matches(ImageFolder, ImageFolderParams, context, archive="cifar10-jpeg.tar.gz", val_fraction=0.25,
                                         mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])
    assert tensors.input_shape == (3, 32, 32) and tensors.augmentation == Augmentation(crop_padding=4, flip=True)


def test_digits_and_synthetic_are_float_without_augmentation(context):
    for dataset, params in ((Digits, DigitsParams(image_size=12, limit=300)), (Synthetic, SyntheticParams(image_size=6, channels=2, train_size=40))):
        loaded, tensors = dataset(params).load(context), dataset(params).load_tensors(context)
        assert tensors.augmentation is None
        assert (tensors.num_classes, tensors.input_shape, tensors.class_names) == (loaded.num_classes, loaded.input_shape, loaded.class_names)
        for expected, actual in ((loaded.train, tensors.train), (loaded.val, tensors.val), (loaded.test, tensors.test)):
            assert actual.images.dtype == torch.float32 and actual.mean is None
            assert_same_samples(expected, actual, atol=0)
        actual_bytes = sum(s.nbytes for s in (tensors.train, tensors.val, tensors.test))
        assert actual_bytes / 2 <= dataset(params).tensor_bytes(context) <= actual_bytes * 2
    assert Digits.offers_tensors() and Synthetic.offers_tensors() and ImageFolder.offers_tensors() and Cifar10.offers_tensors()


def test_missing_files_give_no_estimate(tmp_path, context):
    assert Cifar10(TorchvisionParams(root="nowhere")).tensor_bytes(context) is None
    assert ImageFolder(ImageFolderParams(root="nowhere")).tensor_bytes(context) is None
