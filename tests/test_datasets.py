"""The image dataset plugins (cifar10, cifar100, stl10, imagefolder) on tiny files written
in each real on-disk format, read through torchvision's own readers.

About torchvision's md5 checks: the plugins verify the files themselves (existence and,
with ``verify_checksums = true``, the default, the md5 from torchvision's own tables) and
then construct torchvision's reader classes with the redundant integrity check off. The
tiny files here cannot match the published md5s, so the loading tests set
``verify_checksums = false``; ``test_cifar_md5_mismatch_is_a_clear_error`` covers the check.
The reading code (pickle batches, STL-10 column-major binaries, ImageFolder) is
torchvision's in every case.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyramidkd.engine import DatasetContext, DatasetError, RecipeError
from pyramidkd.engine.host import make_plugin_host
from pyramidkd.engine.validation import Structurer
from pyramidkd.plugins.datasets import imagefolder as imagefolder_module
from pyramidkd.plugins.datasets import vision
from pyramidkd.plugins.datasets.imagefolder import ImageFolder, ImageFolderParams, extract_archive
from pyramidkd.plugins.datasets.vision import (
    CIFAR10_STATS,
    IMAGENET_STATS,
    STL10_STATS,
    Cifar10,
    Cifar100,
    Stl10,
    STL10Params,
    TorchvisionParams,
)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- writers of the real on-disk formats ------------------------------------------


def pattern(label: int, size: int) -> np.ndarray:
    """An HWC uint8 image: R codes the label, G rises along x, B along y (so a
    transposed or mis-ordered read is caught)."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    ramp = (np.arange(size) * (200 // max(size - 1, 1))).astype(np.uint8)
    image[:, :, 0] = 10 + 2 * label
    image[:, :, 1] = ramp[None, :]
    image[:, :, 2] = ramp[:, None]
    return image


def balanced_labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def cifar_rows(labels: np.ndarray) -> np.ndarray:
    # CIFAR rows: 1024 red, 1024 green, 1024 blue values, each plane row-major.
    return np.stack([pattern(int(l), 32).transpose(2, 0, 1).reshape(-1) for l in labels])


def dump(path: Path, obj) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def write_cifar10(root: Path, train_per_class: int = 5, test_per_class: int = 2) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = balanced_labels(10, train_per_class, 1)
    for batch, part in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        dump(folder / f"data_batch_{batch}", {"batch_label": f"training batch {batch} of 5", "labels": labels[part].tolist(),
                                               "data": cifar_rows(labels[part]), "filenames": [f"img{i}.png" for i in part]})
    test = balanced_labels(10, test_per_class, 2)
    dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test.tolist(), "data": cifar_rows(test),
                                 "filenames": [f"t{i}.png" for i in range(len(test))]})
    dump(folder / "batches.meta", {"num_cases_per_batch": len(labels) // 5, "label_names": CIFAR10_NAMES, "num_vis": 3072})
    return folder


def write_cifar100(root: Path, classes_used: int = 5, train_per_class: int = 4, test_per_class: int = 2) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, per_class, seed in (("train", train_per_class, 3), ("test", test_per_class, 4)):
        fine = balanced_labels(classes_used, per_class, seed) * 7  # fine labels 0, 7, 14, ... of 100
        dump(folder / name, {"filenames": [f"{name}{i}.png" for i in range(len(fine))], "batch_label": name,
                             "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(), "data": cifar_rows(fine)})
    dump(folder / "meta", {"fine_label_names": [f"fine{i:02d}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return folder


STL_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def write_stl10(root: Path, train_per_class: int = 2, test_per_class: int = 1) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split, per_class, seed in (("train", train_per_class, 5), ("test", test_per_class, 6)):
        labels = balanced_labels(10, per_class, seed)
        # STL-10 stores each channel column-major: [N, C, W, H].
        images = np.stack([pattern(int(l), 96) for l in labels]).transpose(0, 3, 2, 1)
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())  # 1-based on disk
    (folder / "class_names.txt").write_text("\n".join(STL_NAMES) + "\n")
    folds = [" ".join(str(i) for i in range(10 * train_per_class) if i % 10 != fold) for fold in range(10)]
    (folder / "fold_indices.txt").write_text("\n".join(folds) + "\n")
    return folder


def image_bytes(label: int, size: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern(label, size)).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_tree(root: Path, classes=("ant", "bee", "cat"), size: int = 12, train_per_class: int = 6, test_per_class: int = 3, splits=None) -> Path:
    splits = splits or {"train": train_per_class, "test": test_per_class}
    for split, count in splits.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
                (folder / f"{i:04d}.{ext}").write_bytes(image_bytes(label, size, fmt))
    return root


def write_cifar10_jpeg_archive(path: Path, train_per_class: int = 4, test_per_class: int = 2, top: str = "") -> Path:
    """The layout of the shared cifar10-jpeg.tar.gz: <split>/<class_name>/<NNNN>.jpg."""
    with tarfile.open(path, "w:gz") as handle:
        def add_dir(name):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            handle.addfile(info)

        for split, count in (("train", train_per_class), ("test", test_per_class)):
            add_dir(top + split)
            for label, name in enumerate(CIFAR10_NAMES):
                add_dir(f"{top}{split}/{name}")
                for i in range(count):
                    data = image_bytes(label, 32, "JPEG")
                    info = tarfile.TarInfo(f"{top}{split}/{name}/{i:04d}.jpg")
                    info.size = len(data)
                    handle.addfile(info, io.BytesIO(data))
    return path


# --- helpers -----------------------------------------------------------------------


@pytest.fixture
def context(tmp_path):
    return DatasetContext(seed=0, recipe_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def denormalize(tensor: torch.Tensor, stats) -> np.ndarray:
    mean, std = (torch.tensor(s).view(3, 1, 1) for s in stats)
    return ((tensor * std + mean) * 255).round().permute(1, 2, 0).numpy()


def assert_pattern(tensor: torch.Tensor, label: int, stats, atol: float = 0.0) -> None:
    np.testing.assert_allclose(denormalize(tensor, stats), pattern(label, tensor.shape[-1]), atol=atol)


def assert_splits(data, train_total: int, val_fraction: float, num_classes_present: int) -> None:
    train, val = data.train, data.val
    assert len(train) + len(val) == train_total
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(np.concatenate([train.indices, val.indices])) == list(range(train_total))
    per_class = train_total // num_classes_present
    assert np.bincount(val.targets).tolist().count(round(per_class * val_fraction)) == num_classes_present


def recipe_text(dataset: str, extra_stage: bool = False) -> str:
    text = f"""
    [experiment]
    name = "tiny-data"
    seed = 1
    device = "cpu"

    [dataset]
    {textwrap.dedent(dataset).strip()}

    [train]
    epochs = 1
    batch_size = 16
    optimizer = {{ name = "sgd", lr = 0.05 }}

    [[stages]]
    id = "teacher"
    scheme = "scratch"
    model = {{ name = "vgg", layers = [4, "M"] }}
    """
    if extra_stage:
        text += """
    [[stages]]
    id = "student"
    scheme = { name = "kd", teacher = "teacher" }
    model = { name = "vgg", layers = [2, "M"] }
    loss = { name = "kd", temperature = 2.0, alpha = 0.5 }
    """
    return text


def run_recipe(cli, write_recipe, tmp_path, dataset: str, extra_stage: bool = False, overrides=()) -> dict:
    recipe = write_recipe(recipe_text(dataset, extra_stage))
    out = tmp_path / "run"
    result = cli("run", recipe, "--quiet", "--output", out, *[arg for o in overrides for arg in ("--set", o)])
    assert result.code == 0, result.err
    return json.loads((out / "summary.json").read_text())


# --- registration and parameters -----------------------------------------------------


def test_plugins_are_registered():
    names = set(make_plugin_host().registry("dataset").names())
    assert {"cifar10", "cifar100", "stl10", "imagefolder"} <= names


def test_params_defaults_and_validation():
    p = TorchvisionParams()
    assert (p.root, p.download, p.verify_checksums, p.image_size, p.crop_padding, p.flip) == ("", False, True, None, None, True)
    assert (p.val_fraction, p.split_seed, p.limit, p.test_limit, p.mean, p.std) == (0.1, 0, 0, 0, None, None)
    structurer = Structurer("recipe.toml")
    with pytest.raises(RecipeError, match="mean and std go together"):
        structurer.structure(TorchvisionParams, {"mean": [0.5, 0.5, 0.5]}, "dataset")
    with pytest.raises(RecipeError, match=r"dataset\.std: needs 3 values"):
        structurer.structure(TorchvisionParams, {"mean": [0.5, 0.5, 0.5], "std": [0.5]}, "dataset")
    with pytest.raises(RecipeError, match=r"dataset\.std: must be positive"):
        structurer.structure(TorchvisionParams, {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.0, 0.5]}, "dataset")
    with pytest.raises(RecipeError, match=r"dataset\.fold: must be in \[0, 9\]"):
        structurer.structure(STL10Params, {"fold": 10}, "dataset")
    with pytest.raises(RecipeError, match="needs root or archive"):
        structurer.structure(ImageFolderParams, {}, "dataset")
    with pytest.raises(RecipeError, match="folder inside the archive"):
        structurer.structure(ImageFolderParams, {"archive": "a.tar.gz", "root": "../x"}, "dataset")


# --- CIFAR-10 / CIFAR-100 -------------------------------------------------------------


def test_cifar10_loads_through_torchvision(tmp_path, context):
    write_cifar10(tmp_path / "data")
    data = Cifar10(TorchvisionParams(root="data", verify_checksums=False, val_fraction=0.2)).load(context)  # root relative to the recipe
    assert data.num_classes == 10 and data.class_names == CIFAR10_NAMES
    assert data.input_shape == (3, 32, 32)
    assert (len(data.train), len(data.val), len(data.test)) == (40, 10, 20)
    assert_splits(data, 50, 0.2, 10)
    for view in (data.val, data.test):
        for i in range(len(view)):
            image, label = view[i]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert label == view.targets[i]
            assert_pattern(image, label, CIFAR10_STATS)  # pixel layout, labels and published normalisation
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and label == data.train.targets[0]
    assert isinstance(data.train.base, vision.CIFAR10)  # torchvision's reader


def test_cifar_split_is_stratified_seeded_and_deterministic(tmp_path, context):
    write_cifar10(tmp_path / "data", train_per_class=10)

    def load(**kwargs):
        return Cifar10(TorchvisionParams(root=str(tmp_path / "data"), verify_checksums=False, **kwargs)).load(context)

    a, b, c = load(split_seed=5), load(split_seed=5), load(split_seed=6)
    assert np.array_equal(a.val.indices, b.val.indices) and np.array_equal(a.train.indices, b.train.indices)
    assert not np.array_equal(a.val.indices, c.val.indices)
    assert np.bincount(a.val.targets, minlength=10).tolist() == [1] * 10  # 10% of 10 per class
    limited = load(limit=40, test_limit=10, val_fraction=0.25)
    assert (len(limited.train), len(limited.val), len(limited.test)) == (30, 10, 10)
    assert np.bincount(limited.train.targets).tolist() == [3] * 10
    assert np.bincount(limited.test.targets).tolist() == [1] * 10
    with pytest.raises(DatasetError, match="validation split is empty"):
        load(limit=10, val_fraction=0.2)


def test_augmentation_on_train_only(tmp_path, context):
    write_cifar10(tmp_path / "data")
    data = Cifar10(TorchvisionParams(root=str(tmp_path / "data"), verify_checksums=False, crop_padding=8, flip=True, val_fraction=0.2)).load(context)
    torch.manual_seed(0)
    draws = [data.train[0][0] for _ in range(12)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random crops / flips
    for view in (data.val, data.test):
        assert torch.equal(view[0][0], view[0][0])
        assert not any("Random" in type(t).__name__ for t in view.transform.transforms)
        assert_pattern(view[0][0], view[0][1], CIFAR10_STATS)
    assert data.train.base is data.val.base  # one copy of the pixels, two views
    plain = Cifar10(TorchvisionParams(root=str(tmp_path / "data"), verify_checksums=False, crop_padding=0, flip=False, val_fraction=0.2)).load(context)
    assert torch.equal(plain.train[0][0], plain.train[0][0])
    assert_pattern(plain.train[0][0], plain.train[0][1], CIFAR10_STATS)


def test_cifar_resize_and_custom_stats(tmp_path, context):
    write_cifar10(tmp_path / "data")
    stats = ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    data = Cifar10(TorchvisionParams(root=str(tmp_path / "data"), verify_checksums=False, image_size=96, mean=stats[0], std=stats[1], val_fraction=0.2)).load(context)
    assert data.input_shape == (3, 96, 96)
    image, label = data.val[0]
    assert image.shape == (3, 96, 96)
    red = image[0] * 0.25 + 0.5
    assert torch.allclose(red, torch.full_like(red, (10 + 2 * label) / 255), atol=1e-4)
    padding = [t for t in data.train.transform.transforms if type(t).__name__ == "RandomCrop"][0].padding
    assert padding == 12  # default: image_size // 8


def test_cifar100_fine_labels(tmp_path, context):
    write_cifar100(tmp_path / "data")
    data = Cifar100(TorchvisionParams(root=str(tmp_path / "data"), verify_checksums=False, val_fraction=0.25)).load(context)
    assert data.num_classes == 100 and data.class_names[7] == "fine07"
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 10)
    assert set(data.val.targets) == {0, 7, 14, 21, 28}
    image, label = data.test[3]
    assert_pattern(image, label, vision.CIFAR100_STATS)


def test_cifar_md5_mismatch_is_a_clear_error(tmp_path, context):
    folder = write_cifar10(tmp_path / "data")
    dataset = Cifar10(TorchvisionParams(root=str(tmp_path / "data")))  # verify_checksums = true
    dataset.check(context)  # cheap: the files exist
    with pytest.raises(DatasetError) as info:
        dataset.load(context)
    message = str(info.value)
    assert str(folder / "data_batch_1") in message and "md5" in message and vision.CIFAR10.train_list[0][1] in message
    assert "verify_checksums = false" in message


def test_missing_data_names_the_path_and_the_fix(tmp_path, context):
    for cls, params, expected in (
        (Cifar100, TorchvisionParams(root="nowhere"), "cifar-100-python/train"),
        (Cifar10, TorchvisionParams(root="nowhere"), "cifar-10-batches-py/data_batch_1"),
        (Stl10, STL10Params(root="nowhere"), "stl10_binary/train_X.bin"),
    ):
        for call in (cls(params).check, cls(params).load):
            with pytest.raises(DatasetError) as info:
                call(context)
            message = str(info.value)
            assert str(tmp_path / "nowhere" / expected) in message
            assert "download = true" in message and "does not exist" in message
    # the default root is in the cache folder
    with pytest.raises(DatasetError, match=str(tmp_path / "cache" / "datasets" / "cifar-10-batches-py")):
        Cifar10().check(context)
    Cifar10(TorchvisionParams(root="nowhere", download=True)).check(context)  # would download: no error


def test_corrupt_files_name_the_path(tmp_path, context):
    folder = write_cifar10(tmp_path / "data")
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:500])
    with pytest.raises(DatasetError, match=f"{folder / 'data_batch_3'}"):
        Cifar10(TorchvisionParams(root=str(tmp_path / "data"), verify_checksums=False)).load(context)
    folder = write_stl10(tmp_path / "stl")
    (folder / "test_X.bin").write_bytes((folder / "test_X.bin").read_bytes()[:-7])
    with pytest.raises(DatasetError, match=f"{folder / 'test_X.bin'}"):
        Stl10(STL10Params(root=str(tmp_path / "stl"), verify_checksums=False)).load(context)
    (folder / "test_y.bin").write_bytes(bytes(10))  # 0 on disk: not a 1-based label
    (folder / "test_X.bin").write_bytes(np.zeros((10, 3, 96, 96), np.uint8).tobytes())
    with pytest.raises(DatasetError, match=f"labels out of range in {folder / 'test_y.bin'}"):
        Stl10(STL10Params(root=str(tmp_path / "stl"), verify_checksums=False)).load(context)


def test_download_uses_torchvision_archive(tmp_path, context, monkeypatch):
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append((url, filename, md5))
        write_cifar10(Path(root))

    monkeypatch.setattr(vision, "download_and_extract_archive", fake_download)
    data = Cifar10(TorchvisionParams(root="dl", download=True, verify_checksums=False, val_fraction=0.2)).load(context)
    assert calls == [(vision.CIFAR10.url, vision.CIFAR10.filename, vision.CIFAR10.tgz_md5)]
    assert len(data.train) + len(data.val) == 50
    Cifar10(TorchvisionParams(root="dl", download=True, verify_checksums=False, val_fraction=0.2)).load(context)
    assert len(calls) == 1  # present: not downloaded again

    def offline(url, root, filename, md5):
        raise OSError("network unreachable")

    monkeypatch.setattr(vision, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError, match="downloading CIFAR-100 .* failed: network unreachable"):
        Cifar100(TorchvisionParams(root="dl", download=True)).load(context)


# --- STL-10 ---------------------------------------------------------------------------------


def test_stl10_binary_layout(tmp_path, context):
    write_stl10(tmp_path / "data")
    data = Stl10(STL10Params(root=str(tmp_path / "data"), verify_checksums=False, val_fraction=0.5)).load(context)
    assert data.input_shape == (3, 96, 96) and data.num_classes == 10 and data.class_names == STL_NAMES
    assert (len(data.train), len(data.val), len(data.test)) == (10, 10, 10)
    assert_splits(data, 20, 0.5, 10)
    for i in range(len(data.test)):
        image, label = data.test[i]
        assert_pattern(image, label, STL10_STATS)  # column-major on disk, 1-based labels
    folded = Stl10(STL10Params(root=str(tmp_path / "data"), verify_checksums=False, fold=3, val_fraction=0.5)).load(context)
    assert len(folded.train.base) == len(folded.train) + len(folded.val) == 18  # fold 3 of fold_indices.txt: all but 3 and 13
    assert len(folded.test) == 10
    small = Stl10(STL10Params(root=str(tmp_path / "data"), verify_checksums=False, image_size=32, val_fraction=0.5)).load(context)
    assert small.test[0][0].shape == (3, 32, 32) and small.input_shape == (3, 32, 32)


# --- ImageFolder ------------------------------------------------------------------------------


def test_imagefolder_tree(tmp_path, context):
    write_tree(tmp_path / "tree")
    data = ImageFolder(ImageFolderParams(root="tree", val_fraction=1 / 3)).load(context)
    assert data.class_names == ["ant", "bee", "cat"] and data.num_classes == 3
    assert data.input_shape == (3, 12, 12)  # inferred from the first image
    assert (len(data.train), len(data.val), len(data.test)) == (12, 6, 9)
    assert_splits(data, 18, 1 / 3, 3)
    for view in (data.val, data.test):
        for i in range(len(view)):
            image, label = view[i]
            path = view.base.samples[view.indices[i]][0]
            if path.endswith(".png"):
                assert_pattern(image, label, IMAGENET_STATS)
            else:  # JPEG is lossy (chroma subsampling): the label-coded red channel on average
                assert abs(denormalize(image, IMAGENET_STATS)[..., 0].mean() - (10 + 2 * label)) < 4
    resized = ImageFolder(ImageFolderParams(root="tree", image_size=8, mean=[0.5] * 3, std=[0.5] * 3)).load(context)
    assert resized.input_shape == (3, 8, 8) and resized.train[0][0].shape == (3, 8, 8)


def test_imagefolder_computed_stats_and_val_folder(tmp_path, context):
    write_tree(tmp_path / "tree", splits={"train": 4, "val": 2, "test": 2})
    data = ImageFolder(ImageFolderParams(root=str(tmp_path / "tree"), normalization="computed", val_split="val", flip=False, crop_padding=0)).load(context)
    assert (len(data.train), len(data.val), len(data.test)) == (12, 6, 6)
    stacked = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert torch.allclose(stacked.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)  # normalised by the computed statistics
    assert torch.allclose(stacked.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-3)


def test_imagefolder_errors(tmp_path, context):
    with pytest.raises(DatasetError, match=f"image folder not found: {tmp_path / 'missing'}"):
        ImageFolder(ImageFolderParams(root="missing")).check(context)
    write_tree(tmp_path / "tree", splits={"train": 2, "testing": 1})
    with pytest.raises(DatasetError, match=r"test folder not found: .*tree/test \(folders in .*: testing, train\)"):
        ImageFolder(ImageFolderParams(root="tree")).load(context)
    assert len(ImageFolder(ImageFolderParams(root="tree", test_split="testing", val_fraction=0.5)).load(context).test) == 3
    write_tree(tmp_path / "odd", splits={"train": 2})
    write_tree(tmp_path / "odd", classes=("ant", "bee"), splits={"test": 1})
    with pytest.raises(DatasetError, match=r"test classes differ .* missing \['cat'\]"):
        ImageFolder(ImageFolderParams(root="odd", val_fraction=0.5)).load(context)
    bad = tmp_path / "tree" / "train" / "ant" / "0000.png"
    bad.write_bytes(b"not an image")
    data = ImageFolder(ImageFolderParams(root="tree", test_split="testing", image_size=12, val_fraction=0.5)).load(context)
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        for view in (data.train, data.val):
            for i in range(len(view)):
                view[i]


# --- archives --------------------------------------------------------------------------------


def test_archive_in_cifar10_jpeg_layout(tmp_path, context, monkeypatch):
    archive = write_cifar10_jpeg_archive(tmp_path / "cifar10-jpeg.tar.gz")
    params = ImageFolderParams(archive="cifar10-jpeg.tar.gz", val_fraction=0.25, mean=list(CIFAR10_STATS[0]), std=list(CIFAR10_STATS[1]))
    ImageFolder(params).check(context)
    data = ImageFolder(params).load(context)
    assert data.class_names == CIFAR10_NAMES and data.input_shape == (3, 32, 32)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 20)
    image, label = data.test[5]
    assert_pattern(image, label, CIFAR10_STATS, atol=12)  # JPEG is lossy
    extracted = Path(data.train.base.root).parent
    assert extracted.parent == tmp_path / "cache" / "archives" and extracted.name.startswith("cifar10-jpeg-")
    assert [p.name for p in extracted.parent.iterdir()] == [extracted.name]  # no temporary folder left

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(imagefolder_module.tarfile, "open", no_extraction)
    assert len(ImageFolder(params).load(context).test) == 20  # once per cache folder
    monkeypatch.undo()
    copy = tmp_path / "copy" / archive.name  # a copy (new path, new mtime) reuses the extraction
    copy.parent.mkdir()
    shutil.copyfile(archive, copy)
    assert extract_archive(str(copy), context.cache_dir) == str(extracted)
    write_cifar10_jpeg_archive(archive, train_per_class=5)  # a changed archive is extracted again
    assert extract_archive(str(archive), context.cache_dir) != str(extracted)


def test_archive_with_a_top_folder_and_root_inside(tmp_path, context):
    write_cifar10_jpeg_archive(tmp_path / "a.tar.gz", 2, 1, top="cifar10/")
    assert len(ImageFolder(ImageFolderParams(archive="a.tar.gz", val_fraction=0.5)).load(context).test) == 10
    assert len(ImageFolder(ImageFolderParams(archive="a.tar.gz", root="cifar10", val_fraction=0.5)).load(context).test) == 10


def test_interrupted_extraction_is_not_mistaken_for_complete(tmp_path, context, monkeypatch):
    archive = write_cifar10_jpeg_archive(tmp_path / "c.tar.gz", 2, 1)
    destination = Path(imagefolder_module.archive_cache_dir(str(archive), context.cache_dir))
    real_extract = imagefolder_module._extract_all

    def interrupted(handle, folder):
        Path(folder, "train").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(imagefolder_module, "_extract_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_archive(str(archive), context.cache_dir)
    assert not destination.exists() and list(destination.parent.iterdir()) == []
    # a partial folder left by a killed process is ignored, and removed once stale
    leftover = destination.parent / (destination.name + imagefolder_module.PARTIAL + "killed")
    (leftover / "train").mkdir(parents=True)
    os.utime(leftover, (0, 0))
    monkeypatch.setattr(imagefolder_module, "_extract_all", real_extract)
    assert extract_archive(str(archive), context.cache_dir) == str(destination)
    assert sorted(p.name for p in (destination / "train").iterdir()) == CIFAR10_NAMES
    assert not leftover.exists()


def test_unsafe_and_corrupt_archives(tmp_path, context):
    for name, member in (("dotdot", "../evil.txt"), ("nested", "train/../../evil.txt")):
        path = tmp_path / f"{name}.tar.gz"
        with tarfile.open(path, "w:gz") as handle:
            info = tarfile.TarInfo(member)
            info.size = 4
            handle.addfile(info, io.BytesIO(b"evil"))
        with pytest.raises(DatasetError, match="unsafe archive"):
            ImageFolder(ImageFolderParams(archive=path.name)).load(context)
    link = tmp_path / "link.tar.gz"
    with tarfile.open(link, "w:gz") as handle:
        info = tarfile.TarInfo("train/escape")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        handle.addfile(info)
    with pytest.raises(DatasetError, match="unsafe archive"):
        ImageFolder(ImageFolderParams(archive=link.name)).load(context)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "cache" / "evil.txt").exists()
    absolute = tmp_path / "absolute.tar.gz"  # the data filter strips a leading "/": extracted inside, never at that path
    with tarfile.open(absolute, "w:gz") as handle:
        info = tarfile.TarInfo(str(tmp_path / "elsewhere" / "evil.txt"))
        info.size = 4
        handle.addfile(info, io.BytesIO(b"evil"))
    extracted = extract_archive(str(absolute), context.cache_dir)
    assert Path(extracted, str(tmp_path / "elsewhere" / "evil.txt").lstrip("/")).is_file()
    assert not (tmp_path / "elsewhere").exists()
    shutil.rmtree(extracted)
    assert list((tmp_path / "cache" / "archives").iterdir()) == []

    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(os.urandom(2048))
    with pytest.raises(DatasetError, match="not a tar archive"):
        ImageFolder(ImageFolderParams(archive="garbage.tar.gz")).check(context)
    with pytest.raises(DatasetError, match=f"cannot extract {garbage}"):
        ImageFolder(ImageFolderParams(archive="garbage.tar.gz")).load(context)
    good = write_cifar10_jpeg_archive(tmp_path / "good.tar.gz", 3, 1)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DatasetError, match=f"cannot extract {truncated}"):
        ImageFolder(ImageFolderParams(archive="truncated.tar.gz")).load(context)
    with pytest.raises(DatasetError, match=f"archive not found: {tmp_path / 'absent.tar.gz'}"):
        ImageFolder(ImageFolderParams(archive="absent.tar.gz")).check(context)


# --- end to end: pyramidkd run / validate on each format ---------------------------------------


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRAMIDKD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_run_cifar10(cli, write_recipe, tmp_path, cache_env):
    write_cifar10(tmp_path / "data")
    summary = run_recipe(cli, write_recipe, tmp_path, 'name = "cifar10"\nroot = "data"\nverify_checksums = false\nval_fraction = 0.2', extra_stage=True)
    assert summary["dataset"] == {"name": "cifar10", "num_classes": 10, "input_shape": [3, 32, 32], "train": 40, "val": 10, "test": 20}
    assert [s["stage"] for s in summary["stages"]] == ["teacher", "student"]


def test_run_cifar100(cli, write_recipe, tmp_path, cache_env):
    write_cifar100(tmp_path / "data")
    summary = run_recipe(cli, write_recipe, tmp_path, 'name = "cifar100"\nroot = "data"\nverify_checksums = false\nval_fraction = 0.25')
    assert summary["dataset"]["num_classes"] == 100 and summary["dataset"]["train"] == 15


def test_run_stl10(cli, write_recipe, tmp_path, cache_env):
    write_stl10(tmp_path / "data")
    summary = run_recipe(cli, write_recipe, tmp_path, 'name = "stl10"\nroot = "data"\nverify_checksums = false\nval_fraction = 0.5\nimage_size = 48')
    assert summary["dataset"]["input_shape"] == [3, 48, 48] and summary["dataset"]["test"] == 10


def test_run_imagefolder_tree_with_loader_workers(cli, write_recipe, tmp_path, cache_env):
    write_tree(tmp_path / "tree")
    summary = run_recipe(cli, write_recipe, tmp_path, 'name = "imagefolder"\nroot = "tree"\nval_fraction = 0.5\nnormalization = "computed"',
                         overrides=["train.num_workers=1"])
    assert summary["dataset"]["input_shape"] == [3, 12, 12] and summary["dataset"]["train"] == 9


def test_splits_pickle_for_spawned_loader_workers(tmp_path, context):
    write_cifar10(tmp_path / "c10")
    write_stl10(tmp_path / "stl")
    write_tree(tmp_path / "tree")
    for data in (Cifar10(TorchvisionParams(root="c10", verify_checksums=False, val_fraction=0.2)).load(context),
                 Stl10(STL10Params(root="stl", verify_checksums=False, val_fraction=0.5)).load(context),
                 ImageFolder(ImageFolderParams(root="tree", val_fraction=0.5)).load(context)):
        for view in (data.train, data.val, data.test):
            clone = pickle.loads(pickle.dumps(view))
            assert len(clone) == len(view)
            assert torch.equal(clone[0][0], view[0][0]) or view is data.train


def test_run_and_validate_archive(cli, write_recipe, tmp_path, cache_env):
    write_cifar10_jpeg_archive(tmp_path / "cifar10-jpeg.tar.gz")
    dataset = 'name = "imagefolder"\narchive = "cifar10-jpeg.tar.gz"\nimage_size = 32\nval_fraction = 0.25\nlimit = 40\ntest_limit = 10'
    recipe = write_recipe(recipe_text(dataset))
    result = cli("validate", recipe)
    assert result.code == 0, result.err
    assert not (cache_env / "archives").exists()  # validate does not extract
    summary = run_recipe(cli, write_recipe, tmp_path, dataset)
    assert summary["dataset"] == {"name": "imagefolder", "num_classes": 10, "input_shape": [3, 32, 32], "train": 30, "val": 10, "test": 10}
    assert len(list((cache_env / "archives").iterdir())) == 1


def test_validate_reports_missing_data(cli, write_recipe, tmp_path):
    recipe = write_recipe(recipe_text('name = "cifar100"\nroot = "data"'))
    result = cli("validate", recipe)
    assert result.code == 1
    assert f"dataset.root: CIFAR-100 not found: missing {tmp_path / 'data' / 'cifar-100-python' / 'train'}" in result.err
    assert "download = true" in result.err and "cifar-100-python/" in result.err
