"""``pyramidkd bench-deploy``: latency of every exported file of a run, on the runtime
it targets, next to PyTorch eager (and ``torch.compile``) from the checkpoint.

What is timed, for each batch size and thread count: one call of the model on a
fixed batch, warm-up excluded (:func:`.timing.measure_runner`); the median, the 90th
percentile and images/s follow.
ONNX files run on onnxruntime's CPUExecutionProvider with ``intra_op_num_threads``
pinned (and on the CUDA EP when a GPU and onnxruntime-gpu are there; skipped with a
note otherwise); pt2 and TorchScript files and the checkpoint on PyTorch with
``torch.set_num_threads``. The table, JSON and plot: :mod:`.bench_report`.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Callable

import attrs
import torch

from ..errors import UserError
from .export import EXPORT_FOLDER, REPORT_SUFFIX
from .formats import FORMATS, first_line
from .timing import DEFAULT_BUDGET_S, MIN_RUNS, measure_runner, ort_session_runner  # noqa: F401 (MIN_RUNS: re-exported)

DEFAULT_COMPILE_BUDGET_S = 120.0


@attrs.define
class Candidate:
    """One thing to time: an exported file on a runtime, or the checkpoint in PyTorch."""

    run_dir: str
    stage: str
    artefact: str  # the file's name, or "checkpoint"
    format: str  # onnx, onnx-int8, pt2, torchscript, checkpoint
    runtime: str  # onnxruntime-cpu, onnxruntime-cuda, pytorch-eager, torch.compile, ...
    precision: str
    accuracy: float | None
    parameters: int | None
    file_bytes: int | None
    make: Callable[[int | None], Callable[[Any], Any]]  # threads -> run(inputs)
    inputs: Callable[[torch.Tensor], Any] = lambda batch: batch
    pins_threads: bool = True  # False on a GPU
    synchronize: Callable[[], None] = lambda: None


def cuda_ep_available() -> tuple[bool, str]:
    """(usable, why not): the CUDA EP needs a GPU and onnxruntime-gpu."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible"
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return False, "onnxruntime-gpu is not installed (pip install onnxruntime-gpu)"
    return True, ""


def without_grad(make_run: Callable[[], Callable]) -> Callable:
    """A PyTorch runner under ``torch.inference_mode`` (threads: pinned by the caller)."""
    run = make_run()

    def infer(images):
        with torch.inference_mode():
            return run(images)

    return infer


def artefact_candidates(run_dir: str, report: dict, path: str, skipped: list[dict]) -> list[Candidate]:
    """The runtimes one exported file is timed on."""
    from .quantize import INT8_ONNX

    name, stage = report["format"], report["stage"]
    common = dict(run_dir=run_dir, stage=stage, artefact=os.path.basename(path), format=name,
                  precision="int8" if name == INT8_ONNX.name else "fp32",
                  accuracy=report.get("test_accuracy", {}).get("exported"), parameters=report.get("parameters"),
                  file_bytes=os.path.getsize(path))
    if name in ("onnx", INT8_ONNX.name):
        found = [Candidate(**common, runtime="onnxruntime-cpu", make=lambda t: ort_session_runner(path, threads=t),
                           inputs=lambda batch: batch.numpy())]
        usable, why = cuda_ep_available()
        if usable:
            found.append(Candidate(**common, runtime="onnxruntime-cuda", pins_threads=False, inputs=lambda batch: batch.numpy(),
                                   make=lambda t: ort_session_runner(path, threads=None, provider="CUDAExecutionProvider")))
        elif not any(entry["what"] == "onnxruntime-cuda" for entry in skipped):  # said once
            skipped.append({"what": "onnxruntime-cuda", "reason": why})
        return found
    payload = open(path, "rb").read()
    runner = FORMATS[name].runner
    return [Candidate(**common, runtime=f"pytorch ({name})", make=lambda t: without_grad(lambda: runner(payload)))]


def checkpoint_candidates(run_dir: str, stage: str, report: dict, host) -> list[Candidate]:
    """PyTorch eager (CPU; CUDA too where there is a GPU) and torch.compile, from the checkpoint."""
    from .loading import load_model
    from .runs import find_stage

    model = load_model(find_stage(run_dir, stage).checkpoint, host=host)
    common = dict(run_dir=run_dir, stage=stage, artefact="checkpoint", format="checkpoint", precision="fp32",
                  accuracy=report.get("test_accuracy", {}).get("checkpoint"), parameters=report.get("parameters"),
                  file_bytes=None)
    found = [Candidate(**common, runtime="pytorch-eager", make=lambda t: without_grad(lambda: model)),
             Candidate(**common, runtime="torch.compile", make=lambda t: without_grad(lambda: torch.compile(model)))]
    if torch.cuda.is_available():
        on_gpu = load_model(find_stage(run_dir, stage).checkpoint, host=host).cuda()
        found.append(Candidate(**common, runtime="pytorch-eager-cuda", pins_threads=False, inputs=lambda batch: batch.cuda(),
                               make=lambda t: without_grad(lambda: on_gpu),
                               synchronize=torch.cuda.synchronize))
    return found


def run_candidates(run_dir: str, skipped: list[dict]) -> tuple[list[Candidate], list[int]]:
    """Every exported file in ``RUN_DIR/export/`` (by its report), then the checkpoint of
    each stage seen; and the input shape."""
    from .runs import run_recipe_and_host

    folder = os.path.join(run_dir, EXPORT_FOLDER)
    reports = []
    for report_path in sorted(glob.glob(os.path.join(folder, f"*{REPORT_SUFFIX}"))):
        path = report_path[: -len(REPORT_SUFFIX)]
        try:
            report = json.load(open(report_path, encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and "format" in report and "stage" in report and os.path.isfile(path):
            reports.append((report, path))
    if not reports:
        raise UserError(f"no exported file in {folder}", fix=f"export first: pyramidkd export {run_dir} --stage ID "
                        "[--quantize int8]")
    _recipe, host = run_recipe_and_host(run_dir)
    candidates: list[Candidate] = []
    for report, path in reports:
        candidates += artefact_candidates(run_dir, report, path, skipped)
    for stage in dict.fromkeys(report["stage"] for report, _ in reports):
        first = next(report for report, _ in reports if report["stage"] == stage)
        candidates += checkpoint_candidates(run_dir, stage, first, host)
    return candidates, list(reports[0][0]["preprocessing"]["input_shape"])


def time_candidate(candidate: Candidate, batch_sizes: list[int], threads: list[int], input_shape: list[int], *,
                   budget_s: float, compile_left: list[float], skipped: list[dict]) -> list[dict]:
    """The rows of one candidate: each thread count (once on a GPU), each batch size."""
    label = f"{candidate.stage}/{candidate.artefact} on {candidate.runtime}"
    if candidate.runtime == "torch.compile" and compile_left[0] <= 0:
        skipped.append({"what": label, "reason": "the torch.compile budget (--compile-budget) is spent"})
        return []
    rows: list[dict] = []
    before = torch.get_num_threads()
    try:
        for thread_count in (threads if candidate.pins_threads else [None]):
            torch.set_num_threads(thread_count or before)  # PyTorch's pool; onnxruntime pins its own
            done, finished = time_thread_count(candidate, label, thread_count, batch_sizes, input_shape, budget_s=budget_s,
                                               compile_left=compile_left, skipped=skipped)
            rows += done
            if not finished:
                break
    finally:
        torch.set_num_threads(before)
    return rows


def time_thread_count(candidate: Candidate, label: str, thread_count: int | None, batch_sizes: list[int],
                      input_shape: list[int], *, budget_s: float, compile_left: list[float],
                      skipped: list[dict]) -> tuple[list[dict], bool]:
    """The rows at one thread count, and whether to go on (torch.compile may stop early)."""
    rows = []
    compiles = candidate.runtime == "torch.compile"
    run = None if compiles else candidate.make(thread_count)  # torch.compile: made (and failing) in the try below
    for batch_size in batch_sizes:
        batch = torch.randn((batch_size, *input_shape), generator=torch.Generator().manual_seed(batch_size))
        inputs = candidate.inputs(batch)
        if compiles:
            began = time.perf_counter()
            try:
                run = run or candidate.make(thread_count)
                run(inputs)  # compiling happens here, outside the timing
            except Exception as error:  # no C compiler, an unsupported op...: the reference is skipped, not the bench
                skipped.append({"what": label, "reason": f"torch.compile failed: {first_line(error)}"})
                return rows, False
            compile_left[0] -= time.perf_counter() - began
        timing = measure_runner(run, inputs, budget_s=budget_s, synchronize=candidate.synchronize)
        rows.append(row(candidate, batch_size, thread_count, timing))
        if compiles and compile_left[0] <= 0:
            skipped.append({"what": f"{label} (the rest)", "reason": "compiling used up --compile-budget"})
            return rows, False
    return rows, True


def row(candidate: Candidate, batch_size: int, threads: int | None, timing: dict) -> dict:
    return {"run": os.path.basename(os.path.normpath(candidate.run_dir)), "stage": candidate.stage,
            "artefact": candidate.artefact, "format": candidate.format, "runtime": candidate.runtime,
            "precision": candidate.precision, "batch": batch_size, "threads": threads, **timing,
            "images_per_s": batch_size / (timing["median_ms"] / 1e3), "accuracy": candidate.accuracy,
            "parameters": candidate.parameters, "file_bytes": candidate.file_bytes}


def parse_counts(text: str, option: str) -> list[int]:
    """``"1,64"`` -> ``[1, 64]``; ``N`` stands for this machine's CPU count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        values = [cores if part.strip().upper() == "N" else int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{option} {text!r} is not a list of positive integers", fix=f"e.g. {option} 1,64 (N: all {cores} cores)")
    return list(dict.fromkeys(values))


def bench_deploy(run_dirs: list[str], *, batch_sizes: list[int], threads: list[int], budget_s: float = DEFAULT_BUDGET_S,
                 compile_budget_s: float = DEFAULT_COMPILE_BUDGET_S, output: str | None = None) -> dict:
    """Time every exported file of every run; write the table, JSON and plot to
    ``output`` (default ``<first RUN_DIR>/bench-deploy/``) and return the result."""
    from .bench_report import machine, write_results
    from .errors import DEPLOY_PACKAGES, require

    require(*DEPLOY_PACKAGES, purpose="bench-deploy")
    skipped: list[dict] = []
    if compile_budget_s <= 0:
        skipped.append({"what": "torch.compile", "reason": "--compile-budget 0"})
    compile_left = [compile_budget_s]
    rows: list[dict] = []
    for run_dir in run_dirs:
        candidates, input_shape = run_candidates(os.path.abspath(run_dir), skipped)
        for candidate in candidates:
            if candidate.runtime == "torch.compile" and compile_budget_s <= 0:
                continue
            rows += time_candidate(candidate, batch_sizes, threads, input_shape, budget_s=budget_s,
                                   compile_left=compile_left, skipped=skipped)
    result = {"rows": rows, "skipped": skipped, "machine": machine(),
              "settings": {"batch_sizes": batch_sizes, "threads": threads, "budget_s": budget_s,
                           "compile_budget_s": compile_budget_s, "runs": [os.path.abspath(d) for d in run_dirs]}}
    folder = output or os.path.join(os.path.abspath(run_dirs[0]), "bench-deploy")
    result["files"] = write_results(result, folder)
    return result
