"""``slurm``: the sweep's runs as one Slurm job array, through submitit
(needs ``pip install 'pyramidkd[slurm]'``).

    [launcher]
    name = "slurm"
    partition = "gpu"
    time = 120                  # minutes per run
    cpus_per_task = 8           # also the run's torch threads
    gpus_per_task = 1
    mem_gb = 32
    array_parallelism = 16      # runs at the same time
    setup = ["module load cuda", "source ~/venvs/kd/bin/activate"]
    additional = { constraint = "a100" }    # any other #SBATCH option

The sweep submits one array of ``len(jobs)`` tasks (``--array=0-N%PARALLELISM``)
from the login node and waits, polling, reporting each run as its task ends; a
task that fails, times out or is cancelled is reported as failed (its run
continues from its ``last`` checkpoint when the sweep is run again). submitit's
files (the submission script, pickled jobs, Slurm's logs) go to
``SWEEP/.launcher/slurm/``. The sweep folder must be on a file system the
compute nodes share, with the same Python environment (``setup`` activates it).
Stopping the sweep (Ctrl-C) cancels the tasks still queued or running.

``executor = "local"`` runs the same jobs through submitit's local executor, in
processes on this machine, all at once: for trying a sweep file out.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import time
from typing import Any, Literal

import attrs

from pyramidkd.engine import FieldValueError, JobOutcome, Launcher, UserError, hookimpl, install_hint, non_negative, positive, run_job

INSTALL_FIX = f"{install_hint('slurm')} (or pip install 'submitit>=1.5'), or choose another launcher"
POLL_SECONDS = {"slurm": 30.0, "local": 0.5}  # Slurm's accounting is not to be hammered


def import_submitit():
    """The ``submitit`` module, or a :class:`UserError` naming the fix."""
    try:
        import submitit
    except ImportError as error:
        raise UserError(f"the slurm launcher needs the submitit package, which cannot be imported ({error})",
                        fix=INSTALL_FIX) from None
    return submitit


@attrs.define
class SlurmParams:
    partition: str | None = attrs.field(default=None, metadata={"help": "the Slurm partition; default: the cluster's"})
    time: int = attrs.field(default=60, validator=positive, metadata={"help": "minutes per run (--time)"})
    cpus_per_task: int = attrs.field(default=1, validator=positive, metadata={"help": "CPUs per run, also its torch threads"})
    gpus_per_task: int = attrs.field(default=0, validator=non_negative, metadata={"help": "GPUs per run"})
    mem_gb: float | None = attrs.field(default=None, validator=positive, metadata={"help": "memory per run in GB"})
    array_parallelism: int = attrs.field(default=256, validator=positive, metadata={"help": "runs at the same time"})
    account: str | None = None
    qos: str | None = None
    setup: list[str] = attrs.field(factory=list, metadata={
        "help": 'shell lines run before each run, e.g. ["module load cuda", "source venv/bin/activate"]'})
    additional: dict[str, Any] = attrs.field(factory=dict, metadata={
        "help": 'other #SBATCH options, e.g. { constraint = "a100", mail-type = "END" }'})
    executor: Literal["slurm", "local"] = attrs.field(default="slurm", metadata={
        "help": '"local" runs the jobs through submitit on this machine, to try a sweep out'})

    def __attrs_post_init__(self):
        # Checked while the sweep file is validated, before anything runs.
        if importlib.util.find_spec("submitit") is None:
            raise FieldValueError("the slurm launcher needs the submitit package, which is not installed", INSTALL_FIX)


def sbatch_parameters(params: SlurmParams, job_name: str) -> dict[str, Any]:
    """The parameters of submitit's ``SlurmExecutor`` (one task per run)."""
    from submitit.slurm.slurm import _convert_mem

    parameters: dict[str, Any] = {
        "job_name": job_name,
        "time": params.time,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": params.cpus_per_task,
        "array_parallelism": params.array_parallelism,
        "stderr_to_stdout": True,
        "setup": list(params.setup),
        "additional_parameters": dict(params.additional),
    }
    optional = {"partition": params.partition, "gpus_per_task": params.gpus_per_task or None, "mem": _convert_mem(params.mem_gb) if params.mem_gb else None,
                "account": params.account, "qos": params.qos}
    parameters.update({key: value for key, value in optional.items() if value is not None})
    return parameters


def submission_script(params: SlurmParams, job_count: int, folder: str, job_name: str) -> str:
    """The sbatch script that submits ``job_count`` runs as one array: submitit's
    own (the one :class:`SlurmLauncher` submits), without needing Slurm here."""
    import_submitit()
    from submitit.slurm import slurm

    parameters = sbatch_parameters(params, job_name)
    # The command SlurmExecutor puts in the script (building one needs srun here).
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    return slurm._make_sbatch_string(command=command, folder=folder, map_count=job_count, **parameters)


class SlurmLauncher(Launcher):
    """Runs the jobs as one Slurm job array, through submitit."""

    name = "slurm"
    Params = SlurmParams

    def describe(self) -> str:
        p = self.params
        if p.executor == "local":
            return "slurm: submitit's local executor (processes on this machine)"
        where = f"partition {p.partition}" if p.partition else "the default partition"
        gpus = f", {p.gpus_per_task} GPU" if p.gpus_per_task else ""
        return (f"slurm: one job array on {where}, {p.cpus_per_task} CPU{gpus} and {p.time} min per run, "
                f"at most {p.array_parallelism} at a time")

    def launch(self, jobs, on_done, context) -> None:
        submitit = import_submitit()
        jobs = [job if job.threads else attrs.evolve(job, threads=self.params.cpus_per_task) for job in jobs]
        if not jobs:
            return
        executor = self._executor(submitit, os.path.join(context.scratch, "slurm"), context.sweep)
        for job in jobs:
            os.makedirs(os.path.dirname(job.log_file), exist_ok=True)
        submitted_at = time.time()
        tasks = executor.map_array(run_job, jobs)
        job_of = {task.job_id: job for task, job in zip(tasks, jobs)}
        finished: set[str] = set()
        try:
            for task in submitit.helpers.as_completed(tasks, poll_frequency=POLL_SECONDS[self.params.executor]):
                finished.add(task.job_id)
                on_done(_outcome(task, job_of[task.job_id], submitted_at))
        except BaseException:
            for task in tasks:  # an interrupted sweep's tasks do not go on without it
                if task.job_id not in finished:
                    task.cancel(check=False)
            raise

    def _executor(self, submitit, folder: str, job_name: str):
        p = self.params
        if p.executor == "local":
            executor = submitit.LocalExecutor(folder=folder)
            executor.update_parameters(timeout_min=p.time, gpus_per_node=p.gpus_per_task, setup=list(p.setup),
                                       stderr_to_stdout=True)
            return executor
        try:
            executor = submitit.SlurmExecutor(folder=folder)
        except RuntimeError as error:  # no srun: not on a Slurm cluster
            raise UserError(f"cannot submit to Slurm: {error}",
                            fix='run the sweep on a Slurm login node, or set executor = "local" to try it here') from None
        executor.update_parameters(**sbatch_parameters(p, job_name))
        return executor


def _outcome(task, job, submitted_at: float) -> JobOutcome:
    """The run's outcome, or a failure for a task that ended without one."""
    try:
        return task.result()
    except Exception as error:  # noqa: BLE001 - submitit's FailedJobError / UncompletedJobError, or any unpickling error
        reason = f"Slurm task {task.job_id} ended without a result (state {task.state}, {type(error).__name__})"
        return JobOutcome(job.key, "failed", f"{reason}; see {job.log_file} and {task.paths.stdout}",
                          round(time.time() - submitted_at, 3))


@hookimpl
def pyramidkd_register_launchers():
    return [SlurmLauncher]
