"""``pyramidkd export``: a stage's best checkpoint as a deployable file, verified.

:func:`export_stage` rebuilds the stage's model from its checkpoint, exports it
(:mod:`.formats`), runs the exported bytes on the stage's test images against the
PyTorch model (:mod:`.verify`), and only then writes the file and, beside it,
``<file>.json``: format, size, the logits check, both test accuracies, the
preprocessing, versions. Both are written atomically; a failed export or check
writes nothing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import attrs
import torch
from torch import nn

from ..rundir import RunDirectory, atomic_write_bytes, atomic_write_json
from ..training.checkpoints import load_checkpoint
from ..training.models import count_parameters
from ..training.sharing import run_preprocessing
from .formats import Artefact, ExportFormat, get_format
from .loading import complete_preprocessing, rebuilt_model
from .runs import RunStage, find_stage, load_run_splits, run_recipe_and_host, test_batches
from .verify import FP32_TOLERANCE, Verification, verify

EXPORT_FOLDER = "export"
REPORT_SUFFIX = ".json"
EXAMPLE_BATCH = 2  # the example the exporters trace with (the batch axis stays dynamic)


@attrs.define
class Exported:
    path: str
    report_path: str
    report: dict
    notes: list[str]


@attrs.define
class ExportSource:
    """What every format exports from: a finished stage's rebuilt model (eval mode,
    nothing attached), its checkpoint, preprocessing and test split."""

    stage: RunStage
    checkpoint: dict
    preprocessing: dict
    model: nn.Module
    test_split: Any
    host: Any
    train_split: Any = None  # the run's training split (int8 calibration draws from it)
    seed: int = 0  # the run's seed

    def example(self, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
        """A few test images: what the exporters trace with."""
        return next(test_batches(self.test_split, batch))[0]

    def metadata(self) -> dict[str, str]:
        """The JSON every exported file carries (``preprocessing``, ``pyramidkd``)."""
        return {"preprocessing": json.dumps(self.preprocessing, sort_keys=True),
                "pyramidkd": json.dumps(provenance(self.stage, self.checkpoint), sort_keys=True)}


def export_source(run_dir: str, stage_id: str | None = None) -> ExportSource:
    """Stage ``stage_id`` (default: the run's last finished stage) of the run in ``run_dir``, ready to export."""
    stage = find_stage(os.path.abspath(run_dir), stage_id)
    recipe, host = run_recipe_and_host(stage.run_dir)
    checkpoint = load_checkpoint(stage.checkpoint)
    preprocessing = complete_preprocessing(checkpoint, run_preprocessing(RunDirectory(stage.run_dir), checkpoint))
    model = rebuilt_model(checkpoint, stage.checkpoint, host)
    splits = load_run_splits(recipe, host)
    return ExportSource(stage, checkpoint, preprocessing, model, splits.test, host, splits.train, recipe.experiment.seed)


def export_stage(run_dir: str, stage_id: str | None = None, format_name: str = "onnx", output: str | None = None, *,
                 batch_size: int = 64, tolerance: float | None = FP32_TOLERANCE) -> Exported:
    """Export stage ``stage_id`` (default: the run's last finished stage) of the run in
    ``run_dir`` as ``format_name``, verify it, and write it to ``output`` (a file or
    a folder; default ``RUN_DIR/export/<stage><suffix>``) with its report beside it."""
    export_format = get_format(format_name)
    source = export_source(run_dir, stage_id)
    artefact = export_format.export(source.model, source.example(), source.metadata())
    return write_verified(source, export_format, artefact, output, batch_size=batch_size, tolerance=tolerance)


def write_verified(source: ExportSource, export_format: ExportFormat, artefact: Artefact, output: str | None, *,
                   batch_size: int = 64, tolerance: float | None = FP32_TOLERANCE,
                   extra: Callable[[Verification], dict] | None = None) -> Exported:
    """Run ``artefact`` on the stage's test images against the PyTorch model
    (:func:`.verify.verify`); only when it passes, write it and its report (atomically).
    ``extra(verification)`` adds entries to the report (int8: the fp32 comparison)."""
    run = export_format.runner(artefact.payload)
    checked = verify(source.model, run, test_batches(source.test_split, batch_size), tolerance=tolerance,
                     what=f"the exported {export_format.name} model")
    path = output_path(source.stage, export_format, output)
    report = export_report(source, export_format, artefact, checked, path)
    if extra is not None:
        report.update(extra(checked))
    atomic_write_bytes(path, artefact.payload)
    report_path = path + REPORT_SUFFIX
    atomic_write_json(report_path, report)
    return Exported(path, report_path, report, artefact.notes)


def output_path(stage: RunStage, export_format: ExportFormat, output: str | None) -> str:
    name = f"{stage.stage_id}{export_format.suffix}"
    if output is None:
        return os.path.join(stage.run_dir, EXPORT_FOLDER, name)
    if os.path.isdir(output) or output.endswith(os.sep):
        return os.path.join(output, name)
    return os.path.abspath(output)


def provenance(stage: RunStage, checkpoint: dict) -> dict[str, Any]:
    """Where the exported model comes from (the ``pyramidkd`` metadata entry)."""
    from pyramidkd._version import __version__

    return {"pyramidkd": __version__, "stage": stage.stage_id, "model": checkpoint["model"], "epoch": checkpoint.get("epoch"),
            "val_acc": checkpoint.get("val_acc"), "test_acc": stage.result.get("test_acc")}


def export_report(source: ExportSource, export_format: ExportFormat, artefact: Artefact, checked: Verification,
                  path: str) -> dict[str, Any]:
    """The JSON written beside the file."""
    from pyramidkd._version import __version__

    versions = {"pyramidkd": __version__, "torch": torch.__version__, **artefact.versions}
    if "onnxruntime" in export_format.packages:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    return {
        "format": export_format.name,
        "file": os.path.basename(path),
        "file_bytes": len(artefact.payload),
        "exporter": artefact.exporter,
        "notes": list(artefact.notes),
        "run_dir": source.stage.run_dir,
        "stage": source.stage.stage_id,
        "checkpoint": os.path.relpath(source.stage.checkpoint, source.stage.run_dir),
        "source": provenance(source.stage, source.checkpoint),
        "parameters": count_parameters(source.model),
        "verification": checked.to_dict(),
        "test_accuracy": {"exported": checked.accuracy, "checkpoint": checked.reference_accuracy,
                          "recorded_by_the_run": source.stage.result.get("test_acc")},
        "preprocessing": source.preprocessing,
        "versions": versions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
