"""``files``: ``metrics.jsonl`` (one object per record) and ``metrics.csv``.

The CSV columns are the record classes' fields (``pyramidkd.engine.CSV_COLUMNS``):
a metric added to the records appears here without touching this file.
"""

from __future__ import annotations

import csv
import json
import os

from pyramidkd.engine import CSV_COLUMNS, EpochRecord, Logger, TestRecord, hookimpl, read_metrics

JSONL_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"


class FilesLogger(Logger):
    """Metrics as JSON lines and CSV in the run directory.

    When a run continues in its folder, the files are rewritten to hold the
    records of the stages it reuses plus the resumed stage's history, so they
    read exactly as after an uninterrupted run.
    """

    name = "files"

    @hookimpl
    def pyramidkd_run_start(self, run):
        path = run.directory.file(JSONL_FILE)
        kept = [r for r in read_metrics(path) if r.stage in run.completed] if os.path.exists(path) else []
        kept += run.resume_history
        for name in (JSONL_FILE, CSV_FILE):
            if os.path.exists(run.directory.file(name)):
                os.unlink(run.directory.file(name))
        for record in kept:
            self.pyramidkd_metrics(run, None, record)

    @hookimpl
    def pyramidkd_metrics(self, run, stage, record: EpochRecord | TestRecord):
        data = record.to_dict()
        with open(run.directory.file(JSONL_FILE), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(data) + "\n")
        path = run.directory.file(CSV_FILE)
        new = not os.path.exists(path)
        with open(path, "a", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: ("" if data.get(k) is None else data[k]) for k in CSV_COLUMNS})


@hookimpl
def pyramidkd_register_loggers():
    return [FilesLogger]
