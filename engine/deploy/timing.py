"""How one call of a model is timed (``bench-deploy`` and the int8 report): warm-up
first (at least :data:`WARMUP_RUNS` calls, and a tenth of the budget), then as many
calls as ``budget_s`` allows (at least :data:`MIN_RUNS`, at most :data:`MAX_RUNS`)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

WARMUP_RUNS, MIN_RUNS, MAX_RUNS = 2, 5, 2000
DEFAULT_BUDGET_S = 1.0


def measure_runner(run: Callable[[Any], Any], inputs: Any, *, budget_s: float = DEFAULT_BUDGET_S,
                   synchronize: Callable[[], None] = lambda: None) -> dict:
    """Median and p90 milliseconds of ``run(inputs)``, warm-up excluded."""
    start = time.perf_counter()
    warm = 0
    while warm < WARMUP_RUNS or time.perf_counter() - start < 0.1 * budget_s:
        run(inputs)
        warm += 1
    synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MAX_RUNS and (len(times) < MIN_RUNS or time.perf_counter() - start < budget_s):
        began = time.perf_counter()
        run(inputs)
        synchronize()
        times.append(time.perf_counter() - began)
    p90 = statistics.quantiles(times, n=10, method="inclusive")[8] if len(times) > 1 else times[0]
    return {"runs": len(times), "warmup_runs": warm, "median_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * p90}


def ort_session_runner(payload_or_path, *, threads: int | None = 1, provider: str = "CPUExecutionProvider"):
    """``run(numpy batch) -> logits`` on an onnxruntime session, intra-op threads pinned."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(payload_or_path, options, providers=[provider])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})
