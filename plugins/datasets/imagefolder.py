"""``imagefolder``: any ``<root>/<split>/<class>/<image>`` tree, or a .tar.gz of one.

Read with torchvision's ``ImageFolder`` (classes are the sorted folder names; any
image format Pillow reads). ``archive`` names a tar archive (e.g. the shared
CIFAR-10 JPEG data, ``cifar10-jpeg.tar.gz``) that is extracted once into the cache
folder (``PYRAMIDKD_CACHE``, default ``~/.cache/pyramidkd``) under ``archives/``:

* safely: tarfile's ``filter="data"`` rejects absolute paths, ``..``, links leaving
  the folder and device files (an unsafe archive is an error, nothing is written
  outside the temporary folder);
* atomically: into a temporary sibling folder that is renamed into place only when
  complete, so an interrupted extraction is never mistaken for a finished one (and
  two runs extracting at once both end up with one complete copy).

The cache entry is keyed by the archive's name, size and a hash of its first and last
MiB: a copy of the archive reuses the extraction, a changed archive is extracted again.
The cache can be deleted at any time.

The tensor path (``load_tensors``) decodes the selected images once, with Pillow on a
small thread pool, through ``load``'s resize + centre crop, into the decoded-image
cache (``<cache>/decoded/imagefolder-<size>px-<key>.tensors``, keyed by the image
files' paths, sizes and mtimes, the image size and the selection); later runs read
that file (20,000 CIFAR-10 JPEGs: ~5 s to decode on 2 cores, ~0.1 s to read).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from typing import Literal

import attrs
import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import ImageFolder as TorchvisionImageFolder

from pyramidkd.engine import DataSplits, Dataset, DatasetError, FieldValueError, TensorSplit, cached_tensors, decode_images, hookimpl
from pyramidkd.plugins.datasets.digits import limit_per_class
from pyramidkd.plugins.datasets.images import (
    IMAGENET_STATS,
    ImageParams,
    SubsetView,
    augmentation_for,
    build_transforms,
    decoder_versions,
    estimated_bytes,
    make_splits,
    pil_decoder,
    pixel_stats,
    pool_tensor_splits,
    selection_digest,
    split_indices,
)

log = logging.getLogger("pyramidkd")

PARTIAL = ".partial-"
STALE_PARTIAL_S = 6 * 3600  # leftovers of interrupted extractions older than this are removed
SAMPLE_BYTES = 1 << 20  # hashed from each end of an archive for its cache key
STATS_SAMPLE = 2000  # images used for normalization = "computed"


@attrs.define
class ImageFolderParams(ImageParams):
    root: str = attrs.field(default="", metadata={"help": "folder holding <train_split>/<class>/<image> (relative to the recipe); with archive, a folder inside the archive"})
    archive: str = attrs.field(default="", metadata={"help": "a .tar/.tar.gz of such a tree, extracted once into the cache"})
    train_split: str = attrs.field(default="train", metadata={"help": "folder name of the training split"})
    test_split: str = attrs.field(default="test", metadata={"help": "folder name of the test split"})
    val_split: str = attrs.field(default="", metadata={"help": "folder name of a validation split; empty: carve val_fraction from train"})
    normalization: Literal["imagenet", "computed"] = attrs.field(default="imagenet", metadata={"help": "statistics used when mean/std are not given: ImageNet's, or computed on up to 2,000 training images"})

    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        if not self.root and not self.archive:
            raise FieldValueError("needs root or archive", 'set root = "path/to/tree" (holding train/ and test/) or archive = "path/to/data.tar.gz"')
        if self.archive and self.root and (os.path.isabs(self.root) or os.path.normpath(self.root).startswith("..")):
            raise FieldValueError(f"with archive, root is a folder inside the archive, got {self.root!r}", "use a relative path inside the archive, or leave root empty")
        for name in ("train_split", "test_split", "val_split"):
            value = getattr(self, name)
            if value and (os.path.isabs(value) or ".." in value.replace("\\", "/").split("/")):
                raise FieldValueError(f"{name} is a folder name inside root, got {value!r}", f'e.g. {name} = "train"')


def load_image(path: str) -> Image.Image:
    """ImageFolder's loader, with an error that names the file."""
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:  # UnidentifiedImageError is an OSError
        raise DatasetError(f"cannot read image {path}: {error}", fix="replace or delete the file") from None


# --- archives ------------------------------------------------------------------


def archive_cache_dir(archive: str, cache_dir: str) -> str:
    """``<cache>/archives/<name>-<key>``; the key hashes the archive's size and its first
    and last MiB (for a .tar.gz the last bytes hold the CRC of the whole content), so a
    copied archive (new path, new mtime) reuses its extraction and a changed one does not."""
    name = os.path.basename(archive)
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    digest = hashlib.sha1()
    with open(archive, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(str(size).encode())
        digest.update(handle.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            handle.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(handle.read(SAMPLE_BYTES))
    return os.path.join(cache_dir, "archives", f"{name}-{digest.hexdigest()[:12]}")


def _remove_stale_partials(parent: str, prefix: str) -> None:
    now = time.time()
    for entry in os.scandir(parent):
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_PARTIAL_S:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                pass


class UnsafeArchiveError(tarfile.TarError):
    """A member would land outside the destination (Pythons without tarfile filters)."""


UNSAFE = (UnsafeArchiveError, tarfile.FilterError) if hasattr(tarfile, "FilterError") else (UnsafeArchiveError,)


def _extract_all(handle: tarfile.TarFile, destination: str) -> None:
    if hasattr(tarfile, "data_filter"):
        handle.extractall(destination, filter="data")
        return
    # Python without extraction filters (< 3.10.12 / 3.11.4): accept plain files and
    # folders whose paths stay inside ``destination``, nothing else.
    root = os.path.realpath(destination)
    members = []
    for member in handle.getmembers():
        member.name = member.name.lstrip("/")  # as the "data" filter does: an absolute name lands inside
        target = os.path.realpath(os.path.join(root, member.name))
        if os.path.commonpath([root, target]) != root:
            raise UnsafeArchiveError(f"member {member.name!r} would be extracted outside the destination")
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(f"member {member.name!r} is not a plain file or folder")
        members.append(member)
    handle.extractall(destination, members=members)


def extract_archive(archive: str, cache_dir: str) -> str:
    """Extract ``archive`` once into the cache; return the extracted folder."""
    destination = archive_cache_dir(archive, cache_dir)
    if os.path.isdir(destination):
        return destination
    parent = os.path.dirname(destination)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise DatasetError(f"cannot create the cache folder {parent}: {error}", fix="set PYRAMIDKD_CACHE to a writable folder") from None
    prefix = os.path.basename(destination) + PARTIAL
    _remove_stale_partials(parent, prefix)
    temporary = tempfile.mkdtemp(prefix=prefix, dir=parent)
    started = time.time()
    log.info("extracting %s into %s (once)", archive, destination)
    try:
        with tarfile.open(archive, "r:*") as handle:
            _extract_all(handle, temporary)
    except UNSAFE as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise DatasetError(f"unsafe archive {archive}: {error}", key="dataset.archive",
                           fix="the archive holds paths outside its folder, links or special files; use a plain tree of images") from None
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as error:  # truncated: EOFError; bad gzip data: zlib.error
        shutil.rmtree(temporary, ignore_errors=True)
        raise DatasetError(f"cannot extract {archive}: {type(error).__name__}: {error}", key="dataset.archive",
                           fix="the archive is corrupt or not a tar file; copy it again") from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    try:
        os.chmod(temporary, 0o755)  # mkdtemp made it private
        os.rename(temporary, destination)
    except OSError:
        if not os.path.isdir(destination):  # not a concurrent extraction that finished first
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        shutil.rmtree(temporary, ignore_errors=True)
    log.info("extracted %s in %.1fs", os.path.basename(archive), time.time() - started)
    return destination


# --- the dataset -----------------------------------------------------------------


class ImageFolder(Dataset):
    """Any <root>/<split>/<class>/<image> tree (or a .tar.gz of one), torchvision's ImageFolder."""

    name = "imagefolder"
    Params = ImageFolderParams

    def archive_path(self, context) -> str:
        path = context.resolve_path(self.params.archive)
        if not os.path.isfile(path):
            raise DatasetError(
                f"archive not found: {path}",
                key="dataset.archive",
                fix="check the path (relative paths are relative to the recipe's folder), e.g. archive = \"../shared/data/cifar10-jpeg.tar.gz\"",
            )
        return path

    def data_root(self, context) -> str:
        p = self.params
        if not p.archive:
            return context.resolve_path(p.root)
        base = extract_archive(self.archive_path(context), context.cache_dir)
        if p.root:
            return os.path.normpath(os.path.join(base, p.root))
        if not os.path.isdir(os.path.join(base, p.train_split)):
            entries = [e for e in os.scandir(base) if not e.name.startswith(".")]
            if len(entries) == 1 and entries[0].is_dir():  # an archive with one top-level folder
                return entries[0].path
        return base

    def split_folders(self, root: str) -> dict[str, str]:
        p = self.params
        names = {"train": p.train_split, "test": p.test_split}
        if p.val_split:
            names["val"] = p.val_split
        return {split: os.path.join(root, name) for split, name in names.items()}

    def check(self, context) -> None:
        p = self.params
        if p.archive:
            path = self.archive_path(context)
            if not tarfile.is_tarfile(path):
                raise DatasetError(f"not a tar archive: {path}", key="dataset.archive", fix="give a .tar, .tar.gz, .tar.bz2 or .tar.xz file")
            return
        self._check_folders(context.resolve_path(p.root))

    def _check_folders(self, root: str) -> None:
        if not os.path.isdir(root):
            raise DatasetError(f"image folder not found: {root}", key="dataset.root",
                               fix="set root to a folder holding <train_split>/<class>/<image> and <test_split>/... (relative to the recipe), or use archive")
        for split, folder in self.split_folders(root).items():
            if not os.path.isdir(folder):
                present = sorted(e.name for e in os.scandir(root) if e.is_dir())
                raise DatasetError(
                    f"{split} folder not found: {folder} (folders in {root}: {', '.join(present) or 'none'})",
                    key=f"dataset.{split}_split",
                    fix=f"set {split}_split to the folder name of the {split} images",
                )

    def read(self, folder: str) -> TorchvisionImageFolder:
        try:
            return TorchvisionImageFolder(folder, loader=load_image)
        except (FileNotFoundError, OSError) as error:
            raise DatasetError(f"no images found in {folder}: {error}", key="dataset.root",
                               fix="lay the images out as <split>/<class>/<image> (.jpg, .png, ...), one folder per class") from None

    def read_bases(self, context) -> tuple[str, dict[str, TorchvisionImageFolder]]:
        """(the tree's root, torchvision's ImageFolder per split), classes checked."""
        root = self.data_root(context)
        self._check_folders(root)
        bases = {split: self.read(folder) for split, folder in self.split_folders(root).items()}
        train = bases["train"]
        for split, base in bases.items():
            if base.classes != train.classes:
                only_train = sorted(set(train.classes) - set(base.classes))
                only_here = sorted(set(base.classes) - set(train.classes))
                raise DatasetError(
                    f"the {split} classes differ from the training classes in {root}: "
                    f"missing {only_train or 'none'}, extra {only_here or 'none'}",
                    key=f"dataset.{split}_split",
                    fix="every split needs the same class folders (an empty folder is not a class)",
                )
        return root, bases

    def load(self, context) -> DataSplits:
        p = self.params
        root, bases = self.read_bases(context)
        train = bases["train"]
        image_size = p.image_size or self.infer_size(train)
        if p.mean is not None:
            mean, std = p.mean, p.std
        elif p.normalization == "imagenet":
            mean, std = IMAGENET_STATS
        else:
            mean, std = self.compute_stats(train, image_size)
            log.info("imagefolder: computed mean %s, std %s", [round(m, 4) for m in mean], [round(s, 4) for s in std])
        if not p.val_split:  # carve the validation split from train
            return make_splits(train, train.targets, bases["test"], bases["test"].targets, params=p, image_size=image_size,
                               native_size=None, mean=mean, std=std, class_names=train.classes, source=f"imagefolder {root}")
        # An explicit validation folder: limit applies to train, test_limit to test.
        train_tf, eval_tf = build_transforms(image_size, None, p, mean, std)

        def view(split, transform, limit):
            labels = np.asarray(bases[split].targets, dtype=np.int64)
            return SubsetView(bases[split], self.selected(labels, limit), transform, labels)

        return DataSplits(view("train", train_tf, p.limit), view("val", eval_tf, 0), view("test", eval_tf, p.test_limit),
                          len(train.classes), (3, image_size, image_size), list(train.classes))

    def selected(self, labels: np.ndarray, limit: int) -> np.ndarray:
        return limit_per_class(labels, limit, self.params.split_seed) if limit else np.arange(len(labels))

    def infer_size(self, base) -> int:
        path = base.samples[0][0]
        width, height = load_image(path).size
        return min(width, height)

    def stats_sample(self, labels: np.ndarray) -> np.ndarray:
        """The training images ``normalization = "computed"`` measures."""
        return limit_per_class(labels, STATS_SAMPLE, self.params.split_seed) if len(labels) > STATS_SAMPLE else np.arange(len(labels))

    def compute_stats(self, base, image_size: int) -> tuple[list[float], list[float]]:
        labels = np.asarray(base.targets, dtype=np.int64)
        indices = self.stats_sample(labels)
        to_tensor = T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size), T.ToTensor()])
        total = torch.zeros(3, dtype=torch.float64)
        squares = torch.zeros(3, dtype=torch.float64)
        count = 0
        for index in indices:
            pixels = to_tensor(base[int(index)][0]).double().flatten(1)
            total += pixels.sum(1)
            squares += (pixels * pixels).sum(1)
            count += pixels.shape[1]
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(1e-12).sqrt()
        return mean.tolist(), std.tolist()

    # -- the tensor path ---------------------------------------------------------
    def load_tensors(self, context) -> DataSplits:
        """``load``'s images decoded once (through the decoded-image cache) into tensors."""
        p = self.params
        root, bases = self.read_bases(context)
        train = bases["train"]
        image_size = p.image_size or self.infer_size(train)
        labels = {split: np.asarray(base.targets, dtype=np.int64) for split, base in bases.items()}
        if p.val_split:
            parts = {"train": ("train", self.selected(labels["train"], p.limit)), "val": ("val", np.arange(len(labels["val"]))),
                     "test": ("test", self.selected(labels["test"], p.test_limit))}
        else:  # the pool (train + val) is decoded as one, split after
            train_indices, val_indices, test_indices = split_indices(labels["train"], labels["test"], p, f"imagefolder {root}")
            pool = np.union1d(train_indices, val_indices)
            parts = {"pool": ("train", pool), "test": ("test", test_indices)}
        computed = p.mean is None and p.normalization == "computed"
        if computed:
            parts["stats"] = ("train", self.stats_sample(labels["train"]))
        tensors = self.decoded(context, root, bases, parts, image_size)
        if p.mean is not None:
            mean, std = p.mean, p.std
        elif not computed:
            mean, std = IMAGENET_STATS
        else:
            mean, std = tensors["stats"].tolist()
            log.info("imagefolder: computed mean %s, std %s", [round(m, 4) for m in mean], [round(s, 4) for s in std])
        if not p.val_split:
            return pool_tensor_splits(tensors["pool"], pool, train_indices, val_indices, labels["train"], tensors["test"], test_indices,
                                      labels["test"], params=p, image_size=image_size, mean=mean, std=std, class_names=train.classes)

        def split(part: str) -> TensorSplit:
            base, indices = parts[part]
            return TensorSplit(tensors[part], torch.from_numpy(labels[base][indices]), mean, std)

        return DataSplits(split("train"), split("val"), split("test"), len(train.classes), (3, image_size, image_size),
                          list(train.classes), augmentation=augmentation_for(p, image_size))

    def decoded(self, context, root: str, bases: dict, parts: dict[str, tuple[str, np.ndarray]], image_size: int) -> dict[str, torch.Tensor]:
        """uint8 images per part (``stats``: their [mean, std] instead), decoded on a
        thread pool once and then read from the cache, which is keyed by the files."""
        paths = {part: [bases[base].samples[int(i)][0] for i in indices] for part, (base, indices) in parts.items()}
        shape = (3, image_size, image_size)
        decode_one = pil_decoder(image_size, None, load_image)

        def decode() -> dict[str, torch.Tensor]:
            out = {part: decode_images(part_paths, decode_one, shape) for part, part_paths in paths.items()}
            if "stats" in out:
                out["stats"] = pixel_stats(out["stats"])
            return out

        key = {"dataset": self.name, "root": os.path.realpath(root), "image_size": image_size,
               "parts": {part: [len(v), selection_digest(v)] for part, v in paths.items()}, **decoder_versions()}
        sources = [path for part_paths in paths.values() for path in part_paths]
        return cached_tensors(context.cache_dir, f"{self.name}-{image_size}px", key, sources, decode)

    def tensor_bytes(self, context) -> int | None:
        """From the file listing and the first image's size (extracts an archive, as loading would)."""
        try:
            _, bases = self.read_bases(context)
            image_size = self.params.image_size or self.infer_size(bases["train"])
        except DatasetError:
            return None  # loading will report it
        counts = {split: len(base) for split, base in bases.items()}
        return estimated_bytes(counts["train"], counts["test"], self.params, image_size, extra=counts.get("val", 0))


@hookimpl
def pyramidkd_register_datasets():
    return [ImageFolder]
