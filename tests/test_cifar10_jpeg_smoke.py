"""Smoke test on the real CIFAR-10 JPEG archive (the shared data, not part of the project).

The archive is found at ``$PYRAMIDKD_CIFAR10_JPEG`` or ``<repo>/../shared/data/cifar10-jpeg.tar.gz``;
without it these tests skip. It is extracted once per cache folder (``$PYRAMIDKD_CACHE``,
else the engine's default ``~/.cache/pyramidkd``, the folder ``pyramidkd run`` uses too),
so CI and developers pay the extraction (60,000 files: 20-30 s on 2 quiet cores, minutes
on busy ones) once per machine, not per test session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RECIPES, ROOT
from pyramidkd.engine import Augmentation, DatasetContext
from pyramidkd.plugins.datasets.imagefolder import ImageFolder, ImageFolderParams

ARCHIVE_ENV = "PYRAMIDKD_CIFAR10_JPEG"
ARCHIVE = Path(os.environ.get(ARCHIVE_ENV) or ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz").resolve()
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

pytestmark = pytest.mark.skipif(
    not ARCHIVE.is_file(),
    reason=f"the real CIFAR-10 JPEG archive is not at {ARCHIVE} (set {ARCHIVE_ENV} to its path to run these tests)",
)


@pytest.fixture(scope="session")
def jpeg_cache() -> str:
    """The cache folder the archive is extracted into: one per machine, not per session."""
    cache = os.environ.get("PYRAMIDKD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pyramidkd")
    context = DatasetContext(seed=0, recipe_dir=str(ROOT), cache_dir=cache)
    ImageFolder(ImageFolderParams(archive=str(ARCHIVE))).data_root(context)  # extract now (once per cache folder)
    return cache


def test_archive_layout(jpeg_cache):
    context = DatasetContext(seed=0, recipe_dir=str(ROOT), cache_dir=jpeg_cache)
    data = ImageFolder(ImageFolderParams(archive=str(ARCHIVE), val_fraction=0.1, limit=100, test_limit=50)).load(context)
    assert data.class_names == CLASSES and data.num_classes == 10  # alphabetical = the CIFAR-10 label order
    assert data.input_shape == (3, 32, 32)  # inferred from the images
    assert np.bincount(data.train.base.targets).tolist() == [5000] * 10
    assert np.bincount(data.test.base.targets).tolist() == [1000] * 10
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 50)
    image, label = data.test[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10


def test_smoke_recipe_end_to_end(cli, tmp_path, jpeg_cache, monkeypatch):
    monkeypatch.setenv("PYRAMIDKD_CACHE", jpeg_cache)
    out = tmp_path / "run"
    result = cli("run", RECIPES / "cifar10-jpeg" / "smoke.toml", "--quiet", "--output", out, "--set", f"dataset.archive={ARCHIVE}")
    assert result.code == 0, result.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == {"name": "imagefolder", "num_classes": 10, "input_shape": [3, 32, 32], "train": 270, "val": 30, "test": 200}
    assert [s["stage"] for s in summary["stages"]] == ["teacher", "student-kd"]
    assert all(0.0 <= s["test_acc"] <= 1.0 for s in summary["stages"])


def assert_same_samples(expected, actual) -> None:
    assert len(actual) == len(expected)
    for index in range(len(expected)):
        (image, label), (tensor_image, tensor_label) = expected[index], actual[index]
        assert tensor_label == label
        torch.testing.assert_close(tensor_image, image, atol=1e-6, rtol=0)


def check_tensor_path(context, **params) -> None:
    """load_tensors (decoded once into the cache) gives load's images: validation and test
    as they are, training with load's augmentation off; a second load reads the cache."""
    tensors = ImageFolder(ImageFolderParams(archive=str(ARCHIVE), **params)).load_tensors(context)
    loaded = ImageFolder(ImageFolderParams(archive=str(ARCHIVE), **params)).load(context)
    plain = ImageFolder(ImageFolderParams(archive=str(ARCHIVE), **{**params, "crop_padding": 0, "flip": False})).load(context)
    assert tensors.class_names == CLASSES and tensors.input_shape == (3, 32, 32)
    assert tensors.augmentation == Augmentation(crop_padding=4, flip=True)
    assert_same_samples(loaded.val, tensors.val)
    assert_same_samples(loaded.test, tensors.test)
    assert_same_samples(plain.train, tensors.train)
    again = ImageFolder(ImageFolderParams(archive=str(ARCHIVE), **params)).load_tensors(context)
    assert torch.equal(again.train.images, tensors.train.images) and torch.equal(again.test.labels, tensors.test.labels)


SMOKE_SELECTION = {"image_size": 32, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616], "val_fraction": 0.1}


def test_tensor_path_matches_the_per_sample_path(jpeg_cache):
    check_tensor_path(DatasetContext(seed=0, recipe_dir=str(ROOT), cache_dir=jpeg_cache), **SMOKE_SELECTION, limit=300, test_limit=200)


@pytest.mark.slow
def test_tensor_path_on_the_pyramid_recipe_selection(jpeg_cache):
    """recipes/cifar10-jpeg/pyramid-forward-cpu.toml's 20,000 images, every one compared."""
    check_tensor_path(DatasetContext(seed=0, recipe_dir=str(ROOT), cache_dir=jpeg_cache), **SMOKE_SELECTION, limit=10000)
