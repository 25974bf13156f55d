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
from .errors import CheckpointError, DatasetError, PluginError, RecipeError, RunDirectoryError, UserError
from .hookspecs import hookimpl, hookspec
from .planning import PlanContext, SourceModel, StageEntry
from .records import CSV_COLUMNS, DatasetInfo, EpochRecord, RunSummary, StageResult, TeacherRef, TestRecord, record_from_dict, read_metrics
from .settings import OptimizerSection, SchedulerSection, TrainSection
from .validation import FieldValueError, between, non_negative, open_unit, positive

__all__ = [
    "clear_progress_bars",
    "format_count",
    "format_markdown_table",
    "format_number",
    "format_percent",
    "format_summary",
    "format_table",
    "percent",
    "progress_bar",
    "summary_rows",
    "CSV_COLUMNS",
    "DatasetInfo",
    "EpochRecord",
    "FieldValueError",
    "RunSummary",
    "StageResult",
    "TeacherRef",
    "TestRecord",
    "between",
    "non_negative",
    "open_unit",
    "positive",
    "record_from_dict",
    "read_metrics",
    "CheckpointError",
    "CheckpointFile",
    "Component",
    "ComponentSpec",
    "DataSplits",
    "Dataset",
    "DatasetContext",
    "DatasetError",
    "Logger",
    "Loss",
    "Model",
    "ModelOutput",
    "NoParams",
    "PluginError",
    "RecipeError",
    "RunDirectoryError",
    "Scheme",
    "StageOutput",
    "StagePlan",
    "UserError",
    "hookimpl",
    "hookspec",
    # planning (schemes)
    "DataShape",
    "ModelSource",
    "OptimizerSection",
    "PlanContext",
    "SchedulerSection",
    "SourceModel",
    "StageEntry",
    "TrainSection",
]
