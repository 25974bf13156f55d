"""Method benchmarks: what each distillation method's loss and feature taps cost a
training step, as a ratio to plain KD measured in the same process.

One SGD step (student and teacher forward with the taps the loss declares, the
loss, backward, update of the student and the loss's own modules) of ``resnet8``
taught by ``resnet14`` on a batch of 64 CIFAR-sized images (100 classes), CPU —
built as the ``kd`` scheme builds a stage (:func:`pyramidkd.engine.loss_taps`,
the loss's ``setup`` / ``setup_data`` on the tapped outputs, CRD's batch indices
through ``start_batch``). ``ab`` and ``ft`` are their two-stage schemes'
first-stage losses (``ab``'s initialisation term, ``ft-paraphraser``) and ``ft``'s
main term; ``hint`` is FitNet's.

    pytest tests/benchmarks/test_bench_methods.py --benchmark-enable     # medians, ratios in extra_info and a table
    python tests/benchmarks/test_bench_methods.py [--rounds 20]           # the ratio table, interleaved rounds

Under the default ``--benchmark-disable`` each method runs one step as a smoke
test. No timing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pytest
import torch

from pyramidkd import testing
from pyramidkd.engine import loss_taps
from pyramidkd.engine.training.state import teacher_outputs
from pyramidkd.engine.training.taps import TapRecorder

pytestmark = pytest.mark.benchmark_suite
BATCH, CLASSES, SHAPE = 64, 100, (3, 32, 32)
DATASET_SIZE = 50_000  # CIFAR-100's training set: CRD's memory bank rows
STUDENT, TEACHER = "resnet8", "resnet14"
BASELINE = "kd"
METHODS = {  # case -> (loss, parameters)
    "kd": ("kd", {}),
    "kd-standardize": ("kd", {"standardize": True, "temperature": 2.0, "kd_weight": 9.0, "ce_weight": 0.1}),
    "dkd": ("dkd", {}),
    "dist": ("dist", {}),
    "hint": ("hint", {}),
    "at": ("at", {}),
    "nst": ("nst", {}),
    "sp": ("sp", {}),
    "pkt": ("pkt", {}),
    "rkd": ("rkd", {}),
    "cc": ("cc", {}),
    "vid": ("vid", {}),
    "kdsvd": ("kdsvd", {}),
    "ofd": ("ofd", {}),
    "reviewkd": ("reviewkd", {}),
    "crd": ("crd", {}),
    "crd-relax": ("crd", {"mode": "relax"}),
    "ab-init": ("ab", {"ce_weight": 0.0}),
    "ft-paraphraser": ("ft-paraphraser", {}),
}


def available_methods() -> list[str]:
    """The cases whose loss is registered (crd only once it is built in)."""
    losses = testing.make_host().registry("loss")
    return [case for case, (name, _) in METHODS.items() if name in losses]


class MethodStep:
    """One method's training step on fixed data, built as the kd scheme builds a stage."""

    def __init__(self, case: str, seed: int = 0):
        name, params = METHODS[case]
        torch.manual_seed(seed)
        self.student = testing.build_component("model", STUDENT).build(CLASSES, SHAPE)
        teacher = testing.build_component("model", TEACHER).build(CLASSES, SHAPE).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        self.loss = testing.build_component("loss", name, params)
        student_taps, teacher_taps = loss_taps(self.loss)
        self.student_tap = TapRecorder(self.student, student_taps, role="student", stage_id=case)
        self.teacher_taps = [TapRecorder(teacher, teacher_taps, role="teacher", stage_id=case)]
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(BATCH, *SHAPE, generator=generator)
        self.targets = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        self.indices = torch.randperm(DATASET_SIZE, generator=generator)[:BATCH]
        self._setup()
        trainable = list(self.student.parameters()) + [p for p in self.loss.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=0.01, momentum=0.9)
        self.loss.start_epoch(1)

    @torch.no_grad()
    def _setup(self) -> None:
        if hasattr(self.loss, "setup_data"):
            labels = torch.randint(0, CLASSES, (DATASET_SIZE,), generator=torch.Generator().manual_seed(1))
            self.loss.setup_data(DATASET_SIZE, labels)
        self.student.eval()
        self.loss.setup(self.student_tap(self.images[:2]), teacher_outputs(self.teacher_taps, self.images[:2]))
        self.student.train()
        self.loss.train()

    def __call__(self) -> float:
        if getattr(self.loss, "needs_indices", False):
            self.loss.start_batch(self.indices)
        loss = self.loss(self.student_tap(self.images), teacher_outputs(self.teacher_taps, self.images), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def close(self) -> None:
        for tap in [self.student_tap, *self.teacher_taps]:
            tap.close()


MEDIANS: dict[str, float] = {}  # case -> median seconds per step, this session (pytest-benchmark enabled)


@pytest.mark.parametrize("case", list(METHODS))  # kd first: the others' ratios need it
def test_training_step_per_method(benchmark, case):
    if case not in available_methods():
        pytest.skip(f"loss {METHODS[case][0]!r} is not registered")
    step = MethodStep(case)
    try:
        benchmark.group = "method-step-cpu"
        rounds, warmup = (10, 1) if benchmark.enabled else (1, 0)  # disabled: one step, the smoke test
        value = benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
        assert value == value and abs(value) != float("inf"), f"{case}: loss {value}"
        if benchmark.enabled and benchmark.stats is not None:
            MEDIANS[case] = benchmark.stats.stats.median
            if BASELINE in MEDIANS:
                benchmark.extra_info["ratio_to_kd"] = round(MEDIANS[case] / MEDIANS[BASELINE], 3)
    finally:
        step.close()


def test_report_the_ratios_to_plain_kd(capsys):
    """Prints the table of this session's medians (with --benchmark-enable)."""
    if BASELINE not in MEDIANS:
        pytest.skip("no timings: run with --benchmark-enable")
    with capsys.disabled():
        print("\n" + format_ratios(MEDIANS))


def format_ratios(medians: dict[str, float]) -> str:
    base = medians[BASELINE]
    lines = [f"one training step, {STUDENT} <- {TEACHER}, batch {BATCH}, {SHAPE[1]}x{SHAPE[2]}, CPU; ratio to plain KD",
             f"{'method':<16} {'ms/step':>9} {'x kd':>7}"]
    lines += [f"{case:<16} {1000 * seconds:>9.1f} {seconds / base:>7.2f}" for case, seconds in medians.items()]
    return "\n".join(lines)


def measure(cases: list[str], rounds: int) -> dict[str, float]:
    """Median seconds per step of each case, rounds interleaved across cases (drift hits all alike)."""
    steps = {case: MethodStep(case) for case in cases}
    times: dict[str, list[float]] = {case: [] for case in cases}
    for step in steps.values():
        step()  # warm-up
    for _ in range(rounds):
        for case, step in steps.items():
            started = time.perf_counter()
            step()
            times[case].append(time.perf_counter() - started)
    for step in steps.values():
        step.close()
    return {case: statistics.median(values) for case, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(format_ratios(measure(available_methods(), args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
