"""Public API for plugin authors.

    from pyramidkd.engine import hookimpl, Loss, Scheme, Model, Dataset, Logger

Implement hooks from :mod:`pyramidkd.engine.hookspecs` and return component
classes derived from the bases below.
"""

from .components import (
    CheckpointFile,
    Component,
    ComponentSpec,
    DataShape,
    DataSplits,
    Dataset,
    DatasetContext,
    Launcher,
    LaunchContext,
    Logger,
    Loss,
    Model,
    ModelOutput,
    ModelSource,
    NoParams,
    Scheme,
    StageOutput,
    StagePlan,
)
from .formatting import (
    clear_progress_bars,
    format_count,
    format_markdown_table,
    format_number,
    format_percent,
    format_summary,
    format_table,
    percent,
    progress_bar,
    summary_rows,
)
from .data.augmentation import Augmentation
from .data.decoded_cache import cached_tensors, decode_images
from .data.splits import TensorSplit
from .errors import CheckpointError, DatasetError, PluginError, RecipeError, RunDirectoryError, UserError, install_hint
from .hookspecs import hookimpl, hookspec
from .sweeps.jobs import JobOutcome, RunJob, outcome_file, run_job, write_job_file
from .planning import PlanContext, SourceModel, StageEntry
from .records import CSV_COLUMNS, DatasetInfo, EpochRecord, RunSummary, StageResult, TeacherRef, TestRecord, record_from_dict, read_metrics
from .settings import OptimizerSection, SchedulerSection, TrainSection
from .tapping import loss_taps
from .validation import FieldValueError, between, non_negative, open_unit, positive

__all__ = [
    "Augmentation",
    "CheckpointError",
    "CheckpointFile",
    "Component",
    "ComponentSpec",
    "CSV_COLUMNS",
    "Dataset",
    "DatasetContext",
    "DatasetError",
    "DatasetInfo",
    "DataShape",
    "DataSplits",
    "EpochRecord",
    "FieldValueError",
    "JobOutcome",
    "Launcher",
    "LaunchContext",
    "Logger",
    "Loss",
    "Model",
    "ModelOutput",
    "ModelSource",
    "NoParams",
    "OptimizerSection",
    "PlanContext",
    "PluginError",
    "RecipeError",
    "RunDirectoryError",
    "RunJob",
    "RunSummary",
    "SchedulerSection",
    "Scheme",
    "SourceModel",
    "StageEntry",
    "StageOutput",
    "StagePlan",
    "StageResult",
    "TeacherRef",
    "TensorSplit",
    "TestRecord",
    "TrainSection",
    "UserError",
    "between",
    "cached_tensors",
    "clear_progress_bars",
    "decode_images",
    "format_count",
    "format_markdown_table",
    "format_number",
    "format_percent",
    "format_summary",
    "format_table",
    "hookimpl",
    "hookspec",
    "install_hint",
    "loss_taps",
    "non_negative",
    "open_unit",
    "outcome_file",
    "percent",
    "positive",
    "progress_bar",
    "read_metrics",
    "record_from_dict",
    "run_job",
    "summary_rows",
    "write_job_file",
]
