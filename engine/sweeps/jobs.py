"""One run of a sweep as a launcher sees it: a picklable :class:`RunJob`, and
:func:`run_job`, which every launcher executes for it somewhere (a child process,
a Ray task, a Slurm array task) and which returns a :class:`JobOutcome`.

The job's run folder is an ordinary run folder: running the same job again
reuses its finished stages and continues an interrupted one from its ``last``
checkpoint (the runner's fingerprint rules), so a launcher may simply retry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import traceback
from typing import Any

import attrs


@attrs.frozen
class RunJob:
    """One cell x seed of a sweep."""

    key: str  # "CELL/seed-N": unique in the sweep, used in messages
    cell: str  # the cell id
    seed: int
    recipe: str  # absolute path of the recipe file
    overrides: tuple[str, ...]  # --set values, experiment.seed included
    folder: str  # absolute path of the run folder
    log_file: str  # absolute path: the run's console output goes here
    threads: int | None = None  # torch CPU threads for the run (None: torch's default)
    max_epochs: int | None = None
    force: bool = False  # continue a run folder whose recipe changed (the sweep's --force)

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["overrides"] = list(self.overrides)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunJob":
        return cls(**{**data, "overrides": tuple(data["overrides"])})


@attrs.frozen
class JobOutcome:
    """How a job ended: ``status`` is "done" or "failed" (``error`` says why)."""

    key: str
    status: str
    error: str | None = None
    time_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobOutcome":
        return cls(**data)


def run_job(job: RunJob) -> JobOutcome:
    """Run (or continue) one job in this process; never raises for a failed run.

    Console output and log records go to ``job.log_file`` (appended: a continued
    run's log follows the interrupted one's)."""
    from ..errors import UserError
    from ..runner import run_recipe

    started = time.time()
    os.makedirs(os.path.dirname(job.log_file), exist_ok=True)
    threads = None
    with open(job.log_file, "a", encoding="utf-8", buffering=1) as log, _output_to(log):
        print(f"== {job.key}: pyramidkd run {job.recipe} --output {job.folder} "
              + " ".join(f"--set {o}" for o in job.overrides), flush=True)
        try:
            if job.threads:
                import torch

                threads = torch.get_num_threads()
                torch.set_num_threads(job.threads)
            # --force continues a folder whose recipe changed: stages whose fingerprint
            # changed are recomputed, the others kept (force alone would recompute all).
            changed_ok = job.force and os.path.exists(os.path.join(job.folder, "recipe.toml"))
            run_recipe(job.recipe, list(job.overrides), output=job.folder, quiet=True, max_epochs=job.max_epochs,
                       resume=changed_ok, force=changed_ok)
        except UserError as error:
            print(f"error: {error}", flush=True)
            return JobOutcome(job.key, "failed", str(error).splitlines()[0], round(time.time() - started, 3))
        except Exception as error:  # any crash of the run: recorded, the sweep goes on
            traceback.print_exc()
            return JobOutcome(job.key, "failed", f"{type(error).__name__}: {error}", round(time.time() - started, 3))
        finally:
            if threads is not None:
                import torch

                torch.set_num_threads(threads)
        print(f"== {job.key}: done in {time.time() - started:.1f} s", flush=True)
    return JobOutcome(job.key, "done", None, round(time.time() - started, 3))


@contextlib.contextmanager
def _output_to(stream):
    """Send stdout, stderr and the ``pyramidkd`` log records to ``stream``."""
    logger = logging.getLogger("pyramidkd")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            yield
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])


def write_job_file(path: str, job: RunJob) -> None:
    from ..rundir import atomic_write_json

    atomic_write_json(path, job.to_dict())


def outcome_file(job_file: str) -> str:
    return job_file + ".outcome.json"


def main(argv: list[str] | None = None) -> int:
    """``python -m pyramidkd.engine.sweeps JOB.json`` (``engine/sweeps/__main__.py``): run one job in a fresh
    process and write ``JOB.json.outcome.json`` (the local launcher's worker)."""
    from ..rundir import atomic_write_json

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pyramidkd.engine.sweeps JOB.json", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as handle:
        job = RunJob.from_dict(json.load(handle))
    outcome = run_job(job)
    atomic_write_json(outcome_file(args[0]), outcome.to_dict())
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
