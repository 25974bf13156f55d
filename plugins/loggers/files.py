"""``files``: ``metrics.jsonl`` (one object per record) and ``metrics.csv``."""

from __future__ import annotations

import csv
import json
import os

from pyramidkd.engine import Logger, hookimpl

CSV_COLUMNS = [
    "kind", "stage", "entry", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "stage_val_loss",
    "best_val_acc", "best_epoch", "lr", "skipped_batches", "test_acc", "test_loss", "train_time_s", "epoch_time_s",
]


class FilesLogger(Logger):
    """Metrics as JSON lines and CSV in the run directory.

    When a run continues in its folder, the files are rewritten to hold the
    records of the stages it reuses plus the resumed stage's history, so they
    read exactly as after an uninterrupted run.
    """

    name = "files"

    @hookimpl
    def pyramidkd_run_start(self, run):
        path = run.directory.file("metrics.jsonl")
        kept = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a crash
                        continue
                    if record.get("stage") in run.completed:
                        kept.append(record)
        kept += run.resume_history
        for name in ("metrics.jsonl", "metrics.csv"):
            if os.path.exists(run.directory.file(name)):
                os.unlink(run.directory.file(name))
        for record in kept:
            self.pyramidkd_metrics(run, None, record)

    @hookimpl
    def pyramidkd_metrics(self, run, stage, record):
        with open(run.directory.file("metrics.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        path = run.directory.file("metrics.csv")
        new = not os.path.exists(path)
        with open(path, "a", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in CSV_COLUMNS})


@hookimpl
def pyramidkd_register_loggers():
    return [FilesLogger]
