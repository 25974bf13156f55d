"""Public API for plugin authors.

    from pyramidkd.engine import hookimpl, Loss, Scheme, Model, Dataset, Logger

Implement hooks from :mod:`pyramidkd.engine.hookspecs` and return component
classes derived from the bases below.
"""

from .components import (
    CheckpointFile,
    Component,
    ComponentSpec,
    DataSplits,
    Dataset,
    DatasetContext,
    Logger,
    Loss,
    Model,
    ModelOutput,
    NoParams,
    Scheme,
    StageOutput,
    StagePlan,
)
from .errors import CheckpointError, DatasetError, PluginError, RecipeError, RunDirectoryError, UserError
from .hookspecs import hookimpl, hookspec
from .records import CSV_COLUMNS, DatasetInfo, EpochRecord, RunSummary, StageResult, TeacherRef, TestRecord, record_from_dict
from .validation import FieldValueError, between, non_negative, open_unit, positive

__all__ = [
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
]
