"""``ray``: each run of a sweep is a Ray task (needs ``pip install 'pyramidkd[ray]'``).

    [launcher]
    name = "ray"
    address = "auto"     # a running cluster ("auto", "ray://head:10001"); default: a local Ray instance
    num_cpus = 4         # per run; also its torch threads
    num_gpus = 1         # per run; Ray sets CUDA_VISIBLE_DEVICES

Ray schedules the tasks over the cluster's resources. Each task runs in a fresh
worker process (``max_calls = 1``): one run per process, as with ``local``, so a
run that crashes its worker is reported as failed and the others go on. The
runs' folders and logs are written by the workers, so on a cluster the sweep
folder must be on a file system every node shares, and every node needs
pyramidkd (the same install, or a ``runtime_env``).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import Any

import attrs

from pyramidkd.engine import FieldValueError, JobOutcome, Launcher, UserError, hookimpl, install_hint, non_negative, positive, run_job

INSTALL_FIX = f"{install_hint('ray')} (or pip install 'ray>=2.9'), or choose another launcher"


def import_ray():
    """The ``ray`` module, or a :class:`UserError` naming the fix."""
    try:
        import ray
    except ImportError as error:
        raise UserError(f"the ray launcher needs the ray package, which cannot be imported ({error})", fix=INSTALL_FIX) from None
    return ray


def _non_empty(instance, attribute, value):
    if value is not None and not value.strip():
        raise FieldValueError("must not be empty", 'set address to "auto" or "ray://HEAD:10001", or leave it out for a local Ray instance')


@attrs.define
class RayParams:
    address: str | None = attrs.field(default=None, validator=_non_empty, metadata={
        "help": 'a running cluster: "auto" or "ray://HEAD:10001"; default: start a local Ray instance'})
    num_cpus: float = attrs.field(default=1.0, validator=positive, metadata={"help": "CPUs per run (its torch threads)"})
    num_gpus: float = attrs.field(default=0.0, validator=non_negative, metadata={"help": "GPUs per run (fractions share one)"})
    max_retries: int = attrs.field(default=0, validator=non_negative, metadata={
        "help": "reruns of a task whose worker died (the run continues from its last checkpoint)"})
    runtime_env: dict[str, Any] | None = attrs.field(default=None, metadata={
        "help": 'Ray\'s runtime environment for the workers, e.g. { pip = ["pyramidkd"] }'})

    def __attrs_post_init__(self):
        # Checked while the sweep file is validated, before anything runs.
        if importlib.util.find_spec("ray") is None:
            raise FieldValueError("the ray launcher needs the ray package, which is not installed", INSTALL_FIX)


class RayLauncher(Launcher):
    """Runs each job as a Ray task, on a local Ray instance or a cluster."""

    name = "ray"
    Params = RayParams

    @property
    def threads(self) -> int:
        return max(1, int(self.params.num_cpus))

    def describe(self) -> str:
        where = f"the Ray cluster at {self.params.address}" if self.params.address else "a local Ray instance"
        gpus = f", {self.params.num_gpus:g} GPU" if self.params.num_gpus else ""
        return f"ray: {where}, {self.params.num_cpus:g} CPU{gpus} per run"

    def launch(self, jobs, on_done, context) -> None:
        ray = import_ray()
        started = self._connect(ray)
        task = ray.remote(num_cpus=self.params.num_cpus, num_gpus=self.params.num_gpus,
                          max_calls=1,  # a fresh worker per run: its own threads, no leftovers
                          max_retries=self.params.max_retries)(run_job)
        waiting: dict[Any, tuple] = {}
        try:
            for job in jobs:
                job = job if job.threads else attrs.evolve(job, threads=self.threads)
                waiting[task.remote(job)] = (job, time.time())
            while waiting:
                ready, _ = ray.wait(list(waiting), num_returns=1)
                for ref in ready:
                    job, submitted = waiting.pop(ref)
                    on_done(_outcome(ray, ref, job, submitted))
        except BaseException:
            for ref in waiting:  # the tasks of an interrupted sweep do not go on without it
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - already ended, or Ray is going down: the original error matters
                    pass
            raise
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ray) -> bool:
        """Join the cluster, or start a local instance; ``True`` when this call
        started Ray (and so shuts it down). A process that already initialised Ray
        (a notebook, a test) keeps its instance."""
        if ray.is_initialized():
            return False
        ray.init(address=self.params.address, runtime_env=self.params.runtime_env, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        return True


def _outcome(ray, ref, job, submitted: float) -> JobOutcome:
    """The task's result, or a failure for a task Ray could not finish (its worker died)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0].rstrip('.')}" if lines else type(error).__name__
        return JobOutcome(job.key, "failed", f"{reason}; see {job.log_file}", round(time.time() - submitted, 3))


@hookimpl
def pyramidkd_register_launchers():
    return [RayLauncher]
