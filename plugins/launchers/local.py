"""``local``: the sweep's runs in child processes on this machine, ``workers`` at a time.

    [launcher]
    name = "local"
    workers = 2          # runs at the same time
    threads = 4          # torch CPU threads per run (default: the CPUs split between workers)
    gpus = [0, 1]        # GPUs by index among the visible ones (default: every visible GPU when there are several)

Each run is a fresh ``python -m pyramidkd.engine.sweeps JOB.json`` process,
so a run that crashes (or is killed) takes no other run with it: it is reported
as failed with its exit code or signal. The children die with the sweep process,
even when that one is killed by SIGKILL (Linux), and a re-run continues them from
their ``last`` checkpoint. They run in a session of their own, so Ctrl-C reaches
only the sweep, which passes one SIGINT on to each running child (a run saves
and stops); a second Ctrl-C passes another (the runs stop at once), a third
kills them.

On a machine with several GPUs each worker gets one through
``CUDA_VISIBLE_DEVICES``; with more workers than GPUs they take turns over the
list, so ``workers = 4`` with ``gpus = [0, 1]`` puts two runs on each GPU.
``gpus`` are indices into the GPUs the sweep itself sees: under
``CUDA_VISIBLE_DEVICES=2,3`` (a scheduler's share), ``gpus = [1]`` is GPU 3.
The children get ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (unless the sweep's environment
sets an order), so ids mean what ``nvidia-smi`` shows rather than CUDA's
fastest-first order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import attrs

from pyramidkd.engine import FieldValueError, JobOutcome, Launcher, RunJob, UserError, hookimpl, outcome_file, positive, write_job_file

JOB_MODULE = "pyramidkd.engine.sweeps"  # `python -m` it with a job file: one run, then an outcome file
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# A Ctrl-C while the children stop sends the next signal: the first asks runs to
# save and stop, the second to stop at once, the third kills.
STOP_SIGNALS = (signal.SIGINT, signal.SIGINT, signal.SIGKILL)


def _gpu_ids(instance, attribute, value):
    if value is not None and any(gpu < 0 for gpu in value):
        raise FieldValueError(f"GPU indices are 0 or more, got {value!r}",
                              "list GPUs by index among the visible ones (nvidia-smi's numbers without CUDA_VISIBLE_DEVICES), e.g. [0, 1]")


@attrs.define
class LocalParams:
    workers: int = attrs.field(default=1, validator=positive, metadata={"help": "how many runs at the same time"})
    threads: int | None = attrs.field(default=None, validator=positive,
                                      metadata={"help": "torch CPU threads per run; default: the CPUs divided by workers"})
    gpus: list[int] | None = attrs.field(default=None, validator=_gpu_ids,
                                         metadata={"help": "GPUs by index among the visible ones (CUDA_VISIBLE_DEVICES when set, else "
                                                           "nvidia-smi's numbers), one per worker; default: every visible GPU when there are several"})


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The CUDA devices this process sees, as ``CUDA_VISIBLE_DEVICES`` names them
    for a child (ids, or UUIDs when the variable lists those)."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(index) for index in range(count)]
    return [entry.strip() for entry in listed.split(",")][:count]


def chosen_gpus(indices: list[int], listed: str | None) -> list[str]:
    """The parent's device names for ``gpus`` indices: entries of its
    ``CUDA_VISIBLE_DEVICES`` when set (a child's own numbering starts again at 0,
    so passing an index on would pick the wrong GPU), else the indices as ids."""
    if listed is None:
        return [str(index) for index in indices]
    visible = [entry.strip() for entry in listed.split(",") if entry.strip()]
    outside = [index for index in indices if index >= len(visible)]
    if outside:
        raise UserError(f"gpus = {indices!r}, but CUDA_VISIBLE_DEVICES={listed!r} makes {len(visible)} GPU(s) visible "
                        f"(indices 0 to {len(visible) - 1}); {outside!r} is not among them", key="launcher.gpus",
                        fix="give indices into the visible GPUs (gpus = [0] is the first one listed), or widen CUDA_VISIBLE_DEVICES")
    return [visible[index] for index in indices]


def worker_slots(workers: int, gpus: list[str]) -> list[str | None]:
    """What each worker runs on: a GPU (taking turns over ``gpus`` when there are
    more workers than GPUs) or, without GPUs to hand out, ``None``."""
    if not gpus:
        return [None] * workers
    return [gpus[index % len(gpus)] for index in range(workers)]


def child_environment(base: dict[str, str], threads: int, gpu: str | None) -> dict[str, str]:
    """The environment of one run's process: its thread count for every maths
    library, and its GPU when it has one (else the variable is left as it is)."""
    env = dict(base)
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    env["PYTHONUNBUFFERED"] = "1"  # a crash's last words reach the log
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # ids as nvidia-smi numbers them (CUDA's default: fastest first)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # looked up here: the child, between fork and exec, only calls it


def _die_with(parent: int):
    """A ``preexec_fn``: the child gets SIGKILL when the thread that started it
    (the sweep's) ends, however the sweep process dies."""

    def arrange() -> None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os._exit(1)

    return arrange if _PRCTL is not None else None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@attrs.define
class Child:
    """One run's process and what it needs to report on it."""

    job: RunJob
    job_file: str
    slot: int  # index of its worker slot
    process: subprocess.Popen
    started: float

    def outcome(self) -> JobOutcome:
        """The outcome the run wrote, or a failure naming how its process ended."""
        try:
            with open(outcome_file(self.job_file), encoding="utf-8") as handle:
                return JobOutcome.from_dict(json.load(handle))
        except (OSError, ValueError, TypeError):
            pass
        code = self.process.wait()  # ended already (or about to, after SIGKILL)
        ended = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
        error = f"the run's process {ended} before it finished; see {self.job.log_file}"
        with open(self.job.log_file, "a", encoding="utf-8") as log:
            print(f"== {self.job.key}: {error}", file=log)
        return JobOutcome(self.job.key, "failed", error, round(time.time() - self.started, 3))


class LocalLauncher(Launcher):
    """Runs each job in a child process on this machine, ``workers`` at a time."""

    name = "local"
    Params = LocalParams

    @property
    def threads(self) -> int:
        return self.params.threads or max(1, available_cpus() // self.params.workers)

    @property
    def gpus(self) -> list[str]:
        if self.params.gpus is not None:
            return chosen_gpus(self.params.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
        found = visible_gpus()
        return found if len(found) > 1 else []  # one GPU: every run uses it anyway

    def describe(self) -> str:
        workers, threads, gpus = self.params.workers, self.threads, self.gpus
        text = f"local: {workers} worker{'s' * (workers != 1)} x {threads} thread{'s' * (threads != 1)}"
        return text + (f", GPUs {', '.join(gpus)}" if gpus else "")

    def launch(self, jobs, on_done, context) -> None:
        threads = self.threads
        pending = collections.deque(job if job.threads else attrs.evolve(job, threads=threads) for job in jobs)
        slots = worker_slots(self.params.workers, self.gpus)
        free = list(range(len(slots)))
        running: dict[concurrent.futures.Future, Child] = {}
        os.makedirs(os.path.join(context.scratch, "jobs"), exist_ok=True)
        # The children are started from this thread (their parent for PR_SET_PDEATHSIG,
        # which lives until they end); the pool's threads only wait for them.
        with concurrent.futures.ThreadPoolExecutor(len(slots), thread_name_prefix="pyramidkd-local") as waiters:
            try:
                while pending or running:
                    while pending and free:
                        child = self._start(pending.popleft(), free.pop(0), slots, context)
                        running[waiters.submit(child.process.wait)] = child
                    finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in finished:
                        child = running.pop(future)
                        free.append(child.slot)
                        on_done(child.outcome())
            except KeyboardInterrupt:
                stop_children(list(running.values()))
                for child in running.values():  # each ended: report how (interrupted runs saved their state)
                    on_done(child.outcome())
                raise
            except BaseException:
                stop_children(list(running.values()))
                raise

    def _start(self, job: RunJob, slot: int, slots: list[str | None], context) -> Child:
        name = re.sub(r"[^A-Za-z0-9._=-]+", "_", job.key)[:80]
        digest = hashlib.sha1(job.key.encode("utf-8")).hexdigest()[:8]  # keys that read alike stay apart
        job_file = os.path.join(context.scratch, "jobs", f"{name}-{digest}.json")
        if os.path.exists(outcome_file(job_file)):  # from an earlier sweep of this folder
            os.remove(outcome_file(job_file))
        write_job_file(job_file, job)
        os.makedirs(os.path.dirname(job.log_file), exist_ok=True)
        with open(job.log_file, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", JOB_MODULE, job_file],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=child_environment(dict(os.environ), job.threads, slots[slot]),
                start_new_session=True,  # Ctrl-C reaches the sweep only; it tells the children
                preexec_fn=_die_with(os.getpid()),
            )
        return Child(job, job_file, slot, process, time.time())


def stop_children(children: list[Child]) -> None:
    """Stop running children and wait for them: SIGINT (a run saves ``last`` and
    stops); a Ctrl-C while waiting moves on to the next of :data:`STOP_SIGNALS`."""
    for signum in STOP_SIGNALS:
        alive = [child for child in children if child.process.poll() is None]
        if not alive:
            return
        for child in alive:
            try:
                child.process.send_signal(signum)
            except ProcessLookupError:
                pass
        try:
            for child in alive:
                child.process.wait()
            return
        except KeyboardInterrupt:
            continue


@hookimpl
def pyramidkd_register_launchers():
    return [LocalLauncher]
