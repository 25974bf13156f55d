"""Which pipeline a run takes (``[train] pipeline``), and loading its data once.

"Pipeline" is the one name of this choice: the recipe key, :attr:`DataChoice.pipeline`,
``Run.pipeline`` and the ``pipeline`` a ``last`` checkpoint records:

* ``"dataloader"``: ``Dataset.load`` — per-sample datasets and transforms in a ``DataLoader``.
* ``"tensor"``: ``Dataset.load_tensors`` — the data set held as tensors, batches
  gathered and augmented with tensor ops (:mod:`.splits`, :mod:`.augmentation`,
  :mod:`.batches`); an error for a data set that does not offer it.
* ``"auto"`` (the default): the tensor path when the data set offers it and its
  tensors (``Dataset.tensor_bytes``, or measured after decoding when that says
  ``None``) take at most :data:`RAM_SHARE` of the available RAM (``MemAvailable`` of
  ``/proc/meminfo``, capped by a cgroup memory limit; ``os.sysconf`` elsewhere);
  else the ``DataLoader`` path.

On CUDA the tensors go to the GPU when they take at most :data:`GPU_SHARE` of its
free memory (``torch.cuda.mem_get_info``), else they stay on the CPU and each batch
is copied over. The data set is loaded once per run, so every stage of a run must
use the same ``pipeline``; under torchrun rank 0 decides for all ranks.

The two paths draw different random numbers (the tensor path draws each epoch's crop
offsets and flips from the stage's generator), so ``pipeline`` is part of a stage's
fingerprint. ``auto`` is decided anew by every run: a resumed stage whose ``last``
checkpoint was written on the other path continues on this run's path, with a warning
(its result is then not bit-identical to an uninterrupted run's).
"""

from __future__ import annotations

import logging
import os

import attrs
import torch

from ..components import ComponentSpec, DatasetContext, DataSplits, StagePlan
from ..distributed import World, broadcast_object
from ..errors import DatasetError, RecipeError
from ..formatting import format_bytes
from .splits import TensorSplit

RAM_SHARE = 0.25  # auto: the tensors may take this share of the available RAM
GPU_SHARE = 0.5  # CUDA: tensors this share of the free GPU memory or less live on the GPU

DOCS_HINT = 'docs/plugins.md, "Offering tensors (the fast data path)"'


@attrs.frozen
class DataChoice:
    """The run's pipeline and why it was chosen (for the one-line note)."""

    uses_tensors: bool
    reason: str

    @property
    def pipeline(self) -> str:
        """``"tensor"`` or ``"dataloader"`` (never ``"auto"``: this is the choice)."""
        return "tensor" if self.uses_tensors else "dataloader"


def run_pipeline(stages: list[StagePlan], dataset: ComponentSpec, recipe_file: str) -> str:
    """The ``pipeline`` every stage uses (they must agree); refuse ``"tensor"`` for a
    data set that does not offer tensors."""
    first = stages[0]
    for stage in stages[1:]:
        if stage.train.pipeline != first.train.pipeline:
            raise RecipeError(
                f'stage {stage.id!r} uses pipeline = "{stage.train.pipeline}" but stage {first.id!r} uses "{first.train.pipeline}"; '
                "the data set is loaded once per run, so every stage must use the same data path",
                file=recipe_file, key=f"stages.{stage.entry_id or stage.id}.train.pipeline",
                fix="set pipeline once, in [train], and not per stage")
    pipeline = first.train.pipeline
    if pipeline == "tensor" and not dataset.cls.offers_tensors():
        raise RecipeError(
            f'pipeline = "tensor", but dataset {dataset.name!r} does not offer tensors (it has no load_tensors)',
            file=recipe_file, key="train.pipeline",
            fix=f'use pipeline = "auto" or "dataloader", or give the dataset a load_tensors method ({DOCS_HINT})')
    return pipeline


def load_run_data(dataset: ComponentSpec, context: DatasetContext, pipeline: str, device: torch.device,
                  world: World) -> tuple[DataSplits, DataChoice, str]:
    """Load the run's data on the chosen path; return it, the choice and the note to print."""
    component = dataset.instantiate()
    choice, data = None, None
    if world.is_main:
        choice, data = choose(component, dataset.name, pipeline, context)
    choice = broadcast_object(world, choice)
    if data is None:
        data = component.load_tensors(context) if choice.uses_tensors else component.load(context)
    if choice.uses_tensors:
        check_tensor_splits(data, dataset.name)
    check_labels(data, dataset)
    if not choice.uses_tensors:
        return data, choice, f"data: DataLoader pipeline ({choice.reason})"
    data, where = place(data, device)
    return data, choice, f"data: tensor pipeline ({choice.reason}; {where})"


def choose(component, name: str, pipeline: str, context: DatasetContext) -> tuple[DataChoice, DataSplits | None]:
    """The path, and the tensors when deciding needed them decoded (else ``None``)."""
    if pipeline == "dataloader":
        return DataChoice(False, 'pipeline = "dataloader"'), None
    if not component.offers_tensors():
        return DataChoice(False, f"{name} does not offer tensors"), None
    if pipeline == "tensor":
        return DataChoice(True, f'pipeline = "tensor"; {name} offers decoded tensors'), None
    free = available_ram()
    estimate, data = component.tensor_bytes(context), None
    if estimate is None:  # only decoding tells
        data = component.load_tensors(context)
        check_tensor_splits(data, name)
        estimate = splits_bytes(data)
    if free is None:
        return DataChoice(True, f"{name} offers decoded tensors, {format_bytes(estimate)}; free RAM unknown"), data
    share = f"{RAM_SHARE:.0%}".replace("%", " %")
    if estimate <= RAM_SHARE * free:
        return DataChoice(True, f"{name} offers decoded tensors, {format_bytes(estimate)} ≤ {share} of {format_bytes(free)} free RAM"), data
    return DataChoice(False, f"{name}'s tensors, {format_bytes(estimate)}, would take more than {share} of "
                             f"{format_bytes(free)} free RAM"), None


def check_tensor_splits(data: DataSplits, name: str) -> None:
    for split in ("train", "val", "test"):
        value = getattr(data, split)
        if not isinstance(value, TensorSplit):
            raise DatasetError(f"dataset {name!r}: load_tensors returned a {type(value).__name__} as its {split} split, "
                               "not a TensorSplit", fix=f"return TensorSplit objects from load_tensors ({DOCS_HINT})")


def check_labels(data: DataSplits, dataset: ComponentSpec) -> None:
    """Every split's labels in ``0..num_classes-1``, checked once, on the CPU, before
    training: on a GPU an out-of-range label is a device-side assert in the loss,
    which kills the process's CUDA context. A split whose labels cannot be read
    without decoding its images (no ``targets``/``labels``) is left to the loss, with a warning."""
    classes = int(data.num_classes)
    source = f"dataset {dataset.name!r}" + "".join(f" ({value})" for key, value in _where(dataset) if value)
    for split in ("train", "val", "test"):
        labels = split_labels(getattr(data, split))
        if labels is None:
            logging.getLogger("pyramidkd").warning(
                f"{source}: the labels of the {split} split are not checked before training (it exposes neither "
                "`targets` nor `labels`); an out-of-range label stops a GPU run with a device-side assert")
            continue
        bad = torch.nonzero((labels < 0) | (labels >= classes)).flatten()
        if len(bad):
            first = int(bad[0])
            raise DatasetError(
                f"{source}: {len(bad)} label(s) of the {split} split are outside 0..{classes - 1} ({classes} classes), "
                f"e.g. sample {first} has label {int(labels[first])}", key="dataset",
                fix="correct the labels (or the class count) of the data set: labels must be 0..num_classes-1; "
                    "the files may be corrupt (re-download them) or a plugin's load/load_tensors numbers its classes differently")


def split_labels(split) -> torch.Tensor | None:
    """A split's labels as an int64 CPU tensor, read without decoding images: a
    TensorSplit, a TensorDataset, a Subset of those, or any data set with ``targets``
    or ``labels``; ``None`` when it has none of these."""
    if isinstance(split, TensorSplit):
        return split.labels.cpu()
    if isinstance(split, torch.utils.data.TensorDataset) and len(split.tensors) >= 2:
        return split.tensors[-1].cpu().long()
    if isinstance(split, torch.utils.data.Subset):
        labels = split_labels(split.dataset)
        return None if labels is None else labels[torch.as_tensor(split.indices, dtype=torch.long)]
    for attribute in ("targets", "labels"):
        labels = getattr(split, attribute, None)
        if labels is not None:
            try:
                return torch.as_tensor(labels).cpu().long().flatten()
            except (TypeError, ValueError, RuntimeError):
                return None
    return None


def _where(dataset: ComponentSpec) -> list[tuple[str, str]]:
    """The dataset's file or folder parameters, to name it in an error."""
    params = getattr(dataset.params, "__attrs_attrs__", ())
    return [(a.name, str(getattr(dataset.params, a.name))) for a in params if a.name in ("root", "path", "file", "folder")]


def splits_bytes(data: DataSplits) -> int:
    return sum(split.nbytes for split in (data.train, data.val, data.test))


def place(data: DataSplits, device: torch.device) -> tuple[DataSplits, str]:
    """Tensors onto the GPU when they fit its share of free memory; where they went."""
    if device.type != "cuda":
        return data, f"on {device.type}"
    need = splits_bytes(data)
    free, _ = torch.cuda.mem_get_info(device)
    share = f"{GPU_SHARE:.0%}".replace("%", " %")
    if need <= GPU_SHARE * free:
        moved = attrs.evolve(data, train=data.train.to(device), val=data.val.to(device), test=data.test.to(device))
        return moved, f"on {device} ({format_bytes(need)} ≤ {share} of {format_bytes(free)} free GPU memory)"
    return data, f"held on cpu ({format_bytes(need)} > {share} of {format_bytes(free)} free GPU memory), each batch copied to {device}"


def available_ram() -> int | None:
    """Bytes of RAM a new allocation can get: ``MemAvailable``, capped by a cgroup
    (v2) memory limit; ``os.sysconf`` where there is no ``/proc/meminfo``."""
    free = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_room()
    return min(free, limit) if limit is not None else free


def _cgroup_room() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as handle:
            limit = handle.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as handle:
            return max(0, int(limit) - int(handle.read().strip()))
    except (OSError, ValueError):
        return None
