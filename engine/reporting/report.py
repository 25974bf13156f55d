"""``pyramidkd report``'s library: which kind of folder it is, then its report.

For each folder it reads ``summary.json`` (one result per stage) and
``metrics.jsonl`` (one record per epoch) back as typed records, rebuilds every
stage's best model from its checkpoint to count MACs, and writes into
``DIR/plots/``:

* ``<stage>.png``: training curves (train/val accuracy and loss vs epoch);
* ``accuracy_vs_params.png``: test accuracy against parameter count, for a chain
  (a run with more than two stages, or several stages planned by one recipe entry).

The report is a dict (``--format json`` prints it, accuracies in percent in keys
ending in ``_pct``) or markdown: a table per run (stage, model, params, MACs, best
and last validation accuracy, test accuracy, the published reference where the
recipe has one, and the difference).

A ``run --seeds`` folder (``DIR/seed-N/...``) is reported as one: mean ± std per
stage and the seeds' training curves overlaid (:mod:`.seeds_report`); a sweep
folder (``sweep.json``) gets the sweep's table and a plot per stage (:mod:`.sweep_report`).
"""

from __future__ import annotations

import os

from ..sweeps.results import is_sweep_folder
from .readers import Hosts
from .run_report import build_run_report, format_run_markdown
from .seeds_report import build_seeds_report, format_seeds_markdown, is_seeds_folder
from .sweep_report import build_sweep_report, format_sweep_report


def build_report(run_dir: str, *, hosts: Hosts | None = None, plots: bool = True) -> dict:
    """The report of a run, a ``--seeds`` folder or a sweep folder; writes the plots."""
    run_dir = os.path.abspath(run_dir)
    hosts = hosts or Hosts()
    if is_sweep_folder(run_dir):
        return build_sweep_report(run_dir, hosts=hosts, plots=plots)
    if is_seeds_folder(run_dir):
        return build_seeds_report(run_dir, hosts=hosts, plots=plots)
    return build_run_report(run_dir, hosts=hosts, plots=plots)


def format_markdown(reports: list[dict]) -> str:
    """The reports one after another, each formatted for its kind."""
    formats = {"seeds": format_seeds_markdown, "sweep": format_sweep_report}
    blocks = [formats.get(r.get("kind"), format_run_markdown)(r) for r in reports]
    return "\n\n".join(blocks) + "\n"


def build_reports(run_dirs: list[str]) -> list[dict]:
    """Every folder's report, models rebuilt with hosts shared between them."""
    hosts = Hosts()
    return [build_report(run_dir, hosts=hosts) for run_dir in run_dirs]
