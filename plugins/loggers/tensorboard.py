"""``tensorboard``: per-epoch scalars of every stage as TensorBoard event files.

Switch it on in a recipe (it needs the optional extra ``tensorboard``; the error names the install command)::

    loggers = ["console", "files", { name = "tensorboard", log_dir = "tb" }]

and look at a run with ``tensorboard --logdir RUN_DIR/tb``. Each stage is a
TensorBoard run of its own (``log_dir/<stage id>/``) with the scalars
``accuracy/train``, ``accuracy/val``, ``loss/train`` (the stage's loss),
``loss/val`` (cross-entropy), ``lr`` and ``best_val_acc`` per epoch (accuracies as
fractions, as in ``metrics.jsonl``), and ``accuracy/test`` (the best checkpoint's
test accuracy) at its epoch. A stage that is recomputed starts its folder afresh;
a resumed stage rewrites the epochs it had done, so the event files read as after
an uninterrupted run.
"""

from __future__ import annotations

import glob
import os
import re

import attrs

from pyramidkd.engine import EpochRecord, FieldValueError, Logger, TestRecord, UserError, hookimpl, install_hint

INSTALL_FIX = f"{install_hint('tensorboard')} (or pip install tensorboard), or remove the tensorboard logger from loggers"
EPOCH_SCALARS = {
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "lr": "lr",
    "best_val_acc": "best_val_acc",
}


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or a :class:`UserError` naming the fix."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # tensorboard missing (or too old for torch)
        raise UserError(f"the tensorboard logger needs the tensorboard package, which cannot be imported ({error})", fix=INSTALL_FIX) from None
    return SummaryWriter


def _non_empty(instance, attribute, value):
    if not value.strip():
        raise FieldValueError("must not be empty", 'set log_dir to a folder name, e.g. "tb"')


@attrs.define
class TensorBoardParams:
    log_dir: str = attrs.field(default="tensorboard", validator=_non_empty,
                               metadata={"help": "folder for the event files, relative to the run directory"})

    def __attrs_post_init__(self):
        # Checked while the recipe is validated (`pyramidkd validate` too), before anything runs.
        try:
            summary_writer_class()
        except UserError as error:
            raise FieldValueError(error.message, error.fix) from None


class TensorBoardLogger(Logger):
    """Per-epoch scalars of each stage in TensorBoard event files (optional extra ``tensorboard``)."""

    name = "tensorboard"
    Params = TensorBoardParams

    def __init__(self, params=None):
        super().__init__(params)
        self.writer_class = summary_writer_class()
        self.writers: dict[str, object] = {}

    def folder(self, run, stage_id: str) -> str:
        root = os.path.expanduser(self.params.log_dir)
        if not os.path.isabs(root):
            root = run.directory.file(root)
        return os.path.join(root, re.sub(r"[^A-Za-z0-9._-]+", "_", stage_id))

    def writer(self, run, stage_id: str, *, fresh: bool = False):
        if stage_id not in self.writers:
            folder = self.folder(run, stage_id)
            if fresh:  # a stage trained again: drop the event files of its earlier attempt
                for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
                    os.unlink(path)
            self.writers[stage_id] = self.writer_class(log_dir=folder)
        return self.writers[stage_id]

    def write(self, writer, record: EpochRecord | TestRecord) -> None:
        if isinstance(record, EpochRecord):
            for field, tag in EPOCH_SCALARS.items():
                value = getattr(record, field)
                if isinstance(value, (int, float)):
                    writer.add_scalar(tag, value, record.epoch)
        elif isinstance(record, TestRecord):
            writer.add_scalar("accuracy/test", record.test_acc, record.epoch or 0)
        writer.flush()

    @hookimpl
    def pyramidkd_stage_start(self, run, stage):
        self.close(stage.id)
        writer = self.writer(run, stage.id, fresh=True)
        if stage.id == run.resume_stage:  # rewrite the epochs done before the interruption
            for record in run.resume_history:
                self.write(writer, record)

    @hookimpl
    def pyramidkd_metrics(self, run, stage, record: EpochRecord | TestRecord):
        stage_id = record.stage or getattr(stage, "id", None)
        if stage_id is not None:
            self.write(self.writer(run, stage_id), record)

    @hookimpl
    def pyramidkd_stage_end(self, run, stage, result):
        self.close(stage.id)

    @hookimpl
    def pyramidkd_run_end(self, run, summary):
        for stage_id in list(self.writers):
            self.close(stage_id)

    def close(self, stage_id: str) -> None:
        writer = self.writers.pop(stage_id, None)
        if writer is not None:
            writer.close()


@hookimpl
def pyramidkd_register_loggers():
    return [TensorBoardLogger]
