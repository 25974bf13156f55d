"""Base classes for everything a plugin can provide.

A component class sets ``name`` (what recipes use) and optionally ``Params``, an
attrs class whose fields are the component's recipe keys; the host validates the
recipe section against it (unknown keys, types, ranges) before anything runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, Sequence

import attrs
import torch
from torch import nn

from .errors import UserError
from .settings import TrainSection

if TYPE_CHECKING:  # a type reference only: the data package is not imported to define the bases
    from .data.augmentation import Augmentation


@attrs.define
class NoParams:
    """Parameters of a component that takes none."""


class Component:
    """Common base: a named, parameterised piece of an experiment."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    description: ClassVar[str] = ""

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()

    @classmethod
    def summary(cls) -> str:
        """One line for listings: ``description`` or the docstring's first line."""
        if cls.description:
            return cls.description
        lines = (cls.__doc__ or "").strip().splitlines()
        return lines[0] if lines else ""


# --- data -------------------------------------------------------------------


@attrs.define
class DataSplits:
    """What a dataset plugin hands to the runner.

    From ``Dataset.load`` the splits are ordinary ``torch.utils.data.Dataset``
    objects (per-sample, through a ``DataLoader``); from ``Dataset.load_tensors``
    they are :class:`~pyramidkd.engine.data.splits.TensorSplit` objects and
    ``augmentation`` says how training batches are augmented.
    """

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: list[str] = attrs.field(factory=list)
    augmentation: Augmentation | None = None  # tensor splits only: training-batch augmentation


@attrs.define(frozen=True)
class DataShape:
    """What a dataset's images look like, known before (or without) loading it."""

    input_shape: tuple[int, int, int]  # (channels, height, width)
    num_classes: int

    def describe(self) -> str:
        return f"{'×'.join(str(n) for n in self.input_shape)} images with {self.num_classes} classes"


@attrs.define
class DatasetContext:
    """Where a dataset loads from and how it is seeded."""

    seed: int
    recipe_dir: str
    cache_dir: str

    def resolve_path(self, path: str) -> str:
        """Resolve a recipe path relative to the recipe's folder (``~`` expanded)."""
        import os

        path = os.path.expanduser(path)
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.recipe_dir, path))


class Dataset(Component):
    """Provides train/validation/test splits of images and labels."""

    kind: ClassVar[str] = "dataset"

    def load(self, context: DatasetContext) -> DataSplits:
        raise NotImplementedError

    def check(self, context: DatasetContext) -> None:
        """Cheap check for ``pyramidkd validate`` (e.g. files exist); raise DatasetError."""

    def load_tensors(self, context: DatasetContext) -> DataSplits:
        """Offer the tensor pipeline: the same splits as ``load`` (same images, same
        split indices) decoded once into :class:`~pyramidkd.engine.data.splits.TensorSplit`
        objects, with ``augmentation`` describing the training augmentation that
        ``load``'s per-sample transforms apply. A dataset that does not override it
        only runs on the ``DataLoader`` path."""
        raise NotImplementedError

    def tensor_bytes(self, context: DatasetContext) -> int | None:
        """Estimated size in bytes of ``load_tensors``' tensors, known without decoding:
        ``pipeline = "auto"`` takes the tensor path when it is at most 25 % of the
        available RAM (:mod:`pyramidkd.engine.data.pipeline`). ``None``: unknown, the run
        decodes and measures."""
        return None

    @classmethod
    def offers_tensors(cls) -> bool:
        """Whether the class implements ``load_tensors`` (the fast data path)."""
        return cls.load_tensors is not Dataset.load_tensors

    def data_shape(self, context: DatasetContext) -> DataShape | None:
        """The image shape and class count ``load`` will give, when known without
        loading (from the parameters); ``None`` when only loading tells. Planning
        uses it to refuse a teacher checkpoint of another shape before training."""
        return None


# --- models -----------------------------------------------------------------


class Model(Component):
    """Builds an ``nn.Module`` mapping images [N, C, H, W] to logits [N, classes]."""

    kind: ClassVar[str] = "model"

    def build(self, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        raise NotImplementedError


@attrs.define
class ModelOutput:
    """A forward pass: logits plus any tapped intermediate tensors (by tap name;
    a ``feat.*`` tap arrives as ``feat.1`` … ``feat.K``)."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = attrs.field(factory=dict)


# --- losses -----------------------------------------------------------------


class Loss(Component, nn.Module):
    """A training objective: ``forward(student, teachers, targets) -> scalar``.

    ``teachers`` is a (possibly empty) sequence of :class:`ModelOutput` computed
    without gradients; ``needs_teacher`` tells schemes whether one is required.

    The feature-tap contract: ``taps`` names the tensors the loss reads from
    ``ModelOutput.features`` — ``feat.0`` (stem) … ``feat.K`` (stage outputs),
    ``preact.1`` … ``preact.K``, ``pooled``; ``feat.*`` / ``preact.*`` mean every
    stage 1 … K of the model (``features`` then holds ``feat.1``, ``feat.2``, …).
    A logit-only loss reads none, and its stage taps nothing. ``matches`` says
    which tapped maps it can compare (``check_features``, run by ``validate``).

    Data hooks (off by default, so they cost nothing): a loss whose ``needs_indices``
    is true (a class or instance attribute) gets each training batch's dataset
    indices — positions in the training split, stable across epochs and resume; under
    torchrun this rank's share — through :meth:`start_batch`, called with a long
    tensor on the training device right before the loss's forward; validation and
    direct calls give none. :meth:`setup_data` (called once per stage, before
    :meth:`setup`, when overridden) tells it the training split's size and labels,
    e.g. to size a memory bank. ``teacher_batch_statistics = True`` makes the loop
    run the teachers' BatchNorm layers on batch statistics while training (their
    running statistics left unchanged; eval mode again for validation and test).
    """

    kind: ClassVar[str] = "loss"
    needs_teacher: ClassVar[bool] = False
    taps: tuple[str, ...] = ()
    # "same_shape" | "same_spatial" (H×W) | "same_channels" | "any" (the loss has its own connector)
    matches: ClassVar[str] = "any"
    epoch: int = 1  # the 1-based epoch being trained, set through start_epoch()
    needs_indices: bool = False  # True: the loop calls start_batch(indices) before each training forward
    teacher_batch_statistics: ClassVar[bool] = False  # True: teachers' BN on batch statistics while training
    # Buffer-name prefixes this loss keeps consistent across ranks itself (CRD's memory
    # bank, updated from gathered rows): DDP does not broadcast them from rank 0 each step.
    rank_local_buffers: ClassVar[tuple[str, ...]] = ()
    batch_indices: torch.Tensor | None = None  # the current training batch's dataset indices (start_batch)

    def __init__(self, params: Any = None):
        nn.Module.__init__(self)
        Component.__init__(self, params)

    def student_taps(self) -> tuple[str, ...]:
        """The student's taps this loss reads (may depend on the parameters)."""
        return self.taps

    def teacher_taps(self) -> tuple[str, ...]:
        """The teachers' taps this loss reads."""
        return self.taps

    def start_epoch(self, epoch: int) -> None:
        """Called by the training loop before each epoch (also the first after a resume)."""
        self.epoch = epoch

    def start_batch(self, indices: torch.Tensor) -> None:
        """Called by the training loop before each training forward when ``needs_indices``
        is true: the batch's indices into the training split (long, on the device)."""
        self.batch_indices = indices

    def setup_data(self, size: int, labels: torch.Tensor | None) -> None:
        """Called once per stage before :meth:`setup` (only when overridden): the
        training split's sample count and its labels (int64, CPU; ``None`` when the
        data set does not expose them without decoding)."""

    def check_features(self, student: dict[str, tuple[int, ...]], teacher: dict[str, tuple[int, ...]]) -> None:
        """Refuse (``UserError``) feature maps this loss cannot compare; called before
        training with the per-sample shapes (no batch dimension) of every tap the stage
        records, by tap name. The default compares the taps both sides share by
        ``matches``; a loss with its own connector keeps ``matches = "any"``."""
        part = {"same_shape": slice(None), "same_spatial": slice(1, None), "same_channels": slice(0, 1)}.get(self.matches)
        if part is None:
            return
        for name in [n for n in student if n in teacher]:
            if tuple(student[name])[part] != tuple(teacher[name])[part]:
                what = self.matches.replace("_", " ")
                raise UserError(
                    f"loss {self.name!r} compares maps of the {what}, but at tap {name!r} the student's is "
                    f"{tuple(student[name])} and the teacher's {tuple(teacher[name])} (per sample)",
                    fix="use a loss whose connector maps any student map onto the teacher's, e.g. \"hint\" "
                    "(1×1-conv regressor and pooling), or models whose maps match there",
                )

    def setup(self, student: ModelOutput, teachers: Sequence[ModelOutput]) -> None:
        """Called once per stage, before the optimiser is built, with the outputs of
        one training batch (no grad); create shape-dependent parameters here (e.g. a
        FitNet regressor). Only called when a subclass overrides it."""

    def inherit_state(self, state: dict[str, torch.Tensor] | None) -> None:
        """Called once per stage after :meth:`setup` when the stage has an ``init_from``,
        with the loss state that source saved (an earlier stage's ``last.pt``; ``None``
        for a checkpoint file or none saved): a loss that continues modules trained in
        an earlier stage (FT's paraphraser) loads them here. Only called when overridden."""

    def forward(self, student: ModelOutput, teachers: Sequence[ModelOutput], targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# --- loggers ----------------------------------------------------------------


class Logger(Component):
    """Receives lifecycle hooks for one run (implement them with ``@hookimpl``)."""

    kind: ClassVar[str] = "logger"


# --- schemes and the stages they plan --------------------------------------


@attrs.define(frozen=True)
class ComponentSpec:
    """A validated component choice: the class, its parameters, its recipe key."""

    cls: type
    params: Any
    key: str = ""

    @property
    def name(self) -> str:
        return self.cls.name

    def instantiate(self):
        return self.cls(self.params)

    def as_dict(self) -> dict:
        return {"name": self.cls.name, **attrs.asdict(self.params)}


@attrs.define(frozen=True)
class StageOutput:
    """A model produced by an earlier stage of the same run (its best checkpoint)."""

    stage_id: str


@attrs.define(frozen=True)
class CheckpointFile:
    """A model stored in a checkpoint file outside the run (self-describing)."""

    path: str
    key: str = ""


ModelSource = StageOutput | CheckpointFile


@attrs.define
class StagePlan:
    """One training stage, as a scheme planned it; the host runs all stages alike."""

    id: str
    model: ComponentSpec
    loss: ComponentSpec
    train: TrainSection
    teachers: list[ModelSource] = attrs.field(factory=list)
    init_from: ModelSource | None = None
    # Parameter-name prefixes that train (None: all). Pyramid stage 1 trains only
    # the layers up to the compressed block.
    trainable: list[str] | None = None
    # Tap name -> module path ("features.12"; "features.12:input" taps the input), or
    # "@<point>", a point of the model's tap_points() ("@feat.2"; "@feat.*": every stage).
    student_taps: dict[str, str] = attrs.field(factory=dict)
    teacher_taps: dict[str, str] = attrs.field(factory=dict)
    # Which checkpoint is "best": highest val accuracy, lowest val loss (the stage's
    # own loss, for feature-matching stages), or simply the last epoch.
    select: Literal["val_acc", "val_loss", "last"] = attrs.field(default="val_acc", validator=attrs.validators.in_(("val_acc", "val_loss", "last")))
    entry_id: str = ""
    info: dict = attrs.field(factory=dict)


class Scheme(Component):
    """Plans the stages of one ``[[stages]]`` entry of a recipe."""

    kind: ClassVar[str] = "scheme"

    def plan(self, entry, context) -> list[StagePlan]:
        """Return the stages for ``entry`` (a :class:`~pyramidkd.engine.planning.StageEntry`);
        ``context`` (:class:`~pyramidkd.engine.planning.PlanContext`) builds
        components, training settings, and resolves references to earlier stages
        and checkpoint files with clear errors."""
        raise NotImplementedError


@attrs.frozen
class LaunchContext:
    """What a launcher gets besides the jobs: the sweep's folder and its name."""

    folder: str  # the sweep folder (absolute); run folders are inside it
    scratch: str  # a folder of the launcher's own under it (job files, Slurm logs)
    sweep: str  # the sweep's name (e.g. a Slurm job name)


class Launcher(Component):
    """Runs a sweep's jobs somewhere: child processes here, Ray tasks, a Slurm
    job array. ``Params`` are the keys of the sweep file's ``[launcher]`` table.

    :meth:`launch` runs every :class:`~pyramidkd.engine.sweeps.jobs.RunJob` by
    calling :func:`~pyramidkd.engine.sweeps.jobs.run_job` on it (in whatever
    process the launcher chooses) and reports each job's
    :class:`~pyramidkd.engine.sweeps.jobs.JobOutcome` through ``on_done`` as soon
    as it ends, from the thread that called ``launch``. A job that crashes its
    process is reported as failed; the others go on. ``launch`` returns when every
    job has been reported.
    """

    def launch(self, jobs, on_done, context: LaunchContext) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for ``sweep --dry-run``: where and how the jobs will run."""
        return self.name


COMPONENT_KINDS: dict[str, type[Component]] = {
    "scheme": Scheme,
    "loss": Loss,
    "dataset": Dataset,
    "model": Model,
    "logger": Logger,
    "launcher": Launcher,
}
