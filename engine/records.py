"""Typed outputs of a run: the epoch and test records, a stage's result, the run summary.

They are what the lifecycle hooks receive, what the loggers write and what
``report`` reads back. Each is a frozen attrs class; ``to_dict()`` gives exactly
the JSON stored on disk (``metrics.jsonl``, ``checkpoints/<stage>/result.json``,
``summary.json``) and ``from_dict()`` reads it back (unknown keys are ignored, so a
newer file still reads). Adding a metric means adding one field here.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, ClassVar, Literal

import attrs

from .errors import RunDirectoryError

SUMMARY_FILE = "summary.json"
# What ``best_test_acc`` is, wherever it is shown: the papers' figure, not a choice we could make blind.
BEST_TEST_LABEL = "best test epoch — the literature's optimistic protocol"


def _from_dict(cls, data: dict[str, Any]):
    names = {field.name for field in attrs.fields(cls) if field.init}
    return cls(**{key: value for key, value in data.items() if key in names})


class _FlatRecord:
    """A record whose JSON is its fields, in order (a ``metrics.jsonl`` line)."""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _from_dict(cls, data)


@attrs.frozen
class EpochRecord(_FlatRecord):
    """One training epoch of one stage, after validation."""

    kind: Literal["epoch"] = attrs.field(default="epoch", init=False)
    stage: str = ""
    entry: str = ""
    epoch: int = 0
    epochs: int = 0
    train_loss: float = 0.0
    train_acc: float = 0.0
    val_loss: float = 0.0
    val_acc: float = 0.0
    stage_val_loss: float | None = None  # the stage's own loss on validation (hint stages select on it)
    best_val_acc: float = 0.0
    best_epoch: int = 0
    lr: float = 0.0
    skipped_batches: int = 0
    train_time_s: float = 0.0
    epoch_time_s: float = 0.0
    test_acc: float | None = None  # [train] test_every_epoch only: this epoch's model on the test split

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        if data["test_acc"] is None:  # written only when measured: files of runs without it keep their shape
            del data["test_acc"]
        return data


@attrs.frozen
class TestRecord(_FlatRecord):
    """The test of a stage's best checkpoint (written once, when the stage ends)."""

    __test__: ClassVar[bool] = False  # not a pytest test class
    kind: Literal["test"] = attrs.field(default="test", init=False)
    stage: str = ""
    entry: str = ""
    epoch: int = 0  # the best epoch
    val_acc: float = 0.0
    test_acc: float = 0.0
    test_loss: float = 0.0


MetricsRecord = EpochRecord | TestRecord


def record_from_dict(data: dict[str, Any]) -> MetricsRecord:
    """A ``metrics.jsonl`` line back as its record class."""
    return TestRecord.from_dict(data) if data.get("kind") == "test" else EpochRecord.from_dict(data)


def read_metrics(path: str) -> list[MetricsRecord]:
    """Every record of a ``metrics.jsonl`` file, in order; a line cut short by a
    crash (or anything else that is not a record) is passed over."""
    records: list[MetricsRecord] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict) and data.get("kind") in ("epoch", "test"):
                records.append(record_from_dict(data))
    return records


def _csv_columns() -> list[str]:
    columns: list[str] = []
    for cls in (EpochRecord, TestRecord):
        columns += [field.name for field in attrs.fields(cls) if field.name not in columns]
    return columns


#: ``metrics.csv`` columns: every field of the epoch record, then the test record's own.
CSV_COLUMNS: list[str] = _csv_columns()


@attrs.frozen
class TeacherRef:
    """A stage's teacher as the result names it: an earlier stage, or a file."""

    stage: str | None = None
    model: str | None = None
    test_acc: float | None = None
    file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.file is not None:
            return {"file": self.file}
        return {"stage": self.stage, "model": self.model, "test_acc": self.test_acc}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TeacherRef":
        return _from_dict(cls, data)

    def label(self) -> str:
        return self.stage if self.stage is not None else (self.file or "?")


@attrs.frozen
class StageResult:
    """A finished stage: its best checkpoint's validation and test accuracy and more."""

    stage: str
    entry: str
    model: str
    model_params: dict[str, Any]
    loss: str
    num_parameters: int  # parameter count of the student ("params" in files written before 0.3.0)
    epochs: int
    select: str
    best_epoch: int
    best_val_acc: float
    last_val_acc: float | None
    test_acc: float
    test_loss: float
    teachers: tuple[TeacherRef, ...] = ()
    inherited_tensors: int = 0
    reference_test_acc: float | None = None
    info: dict[str, Any] = attrs.field(factory=dict)
    checkpoint: str = ""
    time_s: float = 0.0  # all of the stage's training, before and after an interruption
    fingerprint: str | None = None  # of the stage's resolved plan: reuse only on a match
    macs: int | None = None  # the student's forward pass, one image
    train_macs: int | None = None  # the stage's training cost (training.models.training_macs)
    skipped: bool = False  # reused from an earlier run (same fingerprint)
    best_test_acc: float | None = None  # [train] test_every_epoch only: max over epochs (BEST_TEST_LABEL)

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=False)
        data["teachers"] = [teacher.to_dict() for teacher in self.teachers]
        if self.best_test_acc is None:  # written only when measured
            del data["best_test_acc"]
        if not self.skipped:  # stored results never carry the flag
            del data["skipped"]
        return data

    @property
    def params(self) -> int:
        """Deprecated (0.3.0): the parameter count is :attr:`num_parameters`."""
        warnings.warn("StageResult.params is deprecated: use StageResult.num_parameters", DeprecationWarning, stacklevel=2)
        return self.num_parameters

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageResult":
        teachers = tuple(TeacherRef.from_dict(t) for t in data.get("teachers") or ())
        data = {**data, "teachers": teachers}
        if "num_parameters" not in data and isinstance(data.get("params"), int):  # written before 0.3.0
            data["num_parameters"] = data["params"]
        return _from_dict(cls, data)


@attrs.frozen
class DatasetInfo(_FlatRecord):
    name: str
    num_classes: int
    input_shape: list[int]
    train: int
    val: int
    test: int


@attrs.frozen
class RunSummary:
    """A whole run, as written to ``summary.json``."""

    experiment: str
    recipe: str
    seed: int
    device: str
    dataset: DatasetInfo
    stages: tuple[StageResult, ...]
    time_s: float

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=False)
        data["dataset"] = self.dataset.to_dict()
        data["stages"] = [stage.to_dict() for stage in self.stages]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSummary":
        return _from_dict(cls, {
            **data,
            "dataset": DatasetInfo.from_dict(data.get("dataset") or {}),
            "stages": tuple(StageResult.from_dict(s) for s in data.get("stages") or ()),
        })

    def stage(self, stage_id: str) -> StageResult | None:
        return next((s for s in self.stages if s.stage == stage_id), None)


RERUN_FIX = "re-run the recipe into this folder to rewrite it"


def summary_file(run_dir: str) -> str:
    """Where a run folder's summary lies (whether or not the run has finished)."""
    return os.path.join(run_dir, SUMMARY_FILE)


def has_summary(run_dir: str) -> bool:
    """Whether the run in ``run_dir`` finished (its summary is written last)."""
    return os.path.exists(summary_file(run_dir))


def write_summary(run_dir: str, summary: RunSummary) -> None:
    """Write ``summary.json`` atomically: the last file a finished run writes."""
    from .rundir import atomic_write_json  # late: rundir imports torch, reading records needs none

    atomic_write_json(summary_file(run_dir), summary.to_dict())


def load_summary(run_dir: str) -> RunSummary:
    """A finished run's ``summary.json``; a missing or damaged one is an error
    naming the file and the fix."""
    if not os.path.isdir(run_dir):
        raise RunDirectoryError("no such run directory", file=run_dir, fix="pass the folder a run wrote (runs/<name>-<time> or its --output)")
    path = summary_file(run_dir)
    if not os.path.exists(path):
        raise RunDirectoryError(
            f"holds no {SUMMARY_FILE}: not a finished pyramidkd run",
            file=run_dir,
            fix="pass the folder of a finished run; finish an interrupted one with `pyramidkd run RECIPE --output DIR --resume`",
        )
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise RunDirectoryError(f"cannot read {SUMMARY_FILE}: {error}", file=path, fix=RERUN_FIX) from error
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        raise RunDirectoryError(f"{SUMMARY_FILE} has no list of stages", file=path, fix=RERUN_FIX)
    try:
        return RunSummary.from_dict(data)
    except (TypeError, AttributeError) as error:  # a required key missing, or a stage that is not an object
        raise RunDirectoryError(f"{SUMMARY_FILE} is not a pyramidkd run summary ({error})", file=path, fix=RERUN_FIX) from error
