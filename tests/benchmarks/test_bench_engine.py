"""Engine benchmarks: overhead against a bare PyTorch loop, and throughput per speed switch.

* Engine overhead: one KD training epoch of the quickstart student (digits, 16×16,
  teacher = the quickstart VGG) through the engine's stage loop vs a minimal
  hand-written loop doing the same work (same model and weights, same data and
  batch order, same fused loss, same SGD) in the same process, timed interleaved.
  Target: engine / bare ≤ 1.05.
* Throughput: images per second of the quickstart *teacher* stage (the largest
  model) with each switch: fp32, bf16, channels_last, compile.

    pytest tests/benchmarks/test_bench_engine.py --benchmark-enable
    python tests/benchmarks/test_bench_engine.py [--rounds 7]     # the ratio table

Under the default ``--benchmark-disable`` each case runs once as a smoke test
(compile is skipped there: its warm-up takes a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pyramidkd.engine import ops
from pyramidkd.engine.rundir import RunDirectory
from pyramidkd.engine.runner import Run, dataset_context, prepare, run_recipe
from pyramidkd.engine.training.loop import StageRunner

pytestmark = pytest.mark.benchmark_suite
QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.toml"
SWITCHES = {
    "fp32": [],
    "bf16": ["train.precision=\"bf16\""],
    "channels_last": ["train.channels_last=true"],
    "compile": ["train.compile=true"],
}


def stage_runner(folder: Path, stage_id: str, overrides=(), device: str = "cpu") -> tuple[StageRunner, object, object]:
    """A StageRunner for one quickstart stage, set up and ready for train_epoch."""
    overrides = ["train.epochs=1", f'experiment.device="{device}"', *overrides]
    if stage_id == "student-kd" and not (folder / "summary.json").exists():
        run_recipe(str(QUICKSTART), overrides, output=str(folder), quiet=True)  # trains the teacher
    prepared = prepare(str(QUICKSTART), overrides)
    data = prepared.dataset.instantiate().load(dataset_context(prepared.recipe))
    run = Run(prepared.recipe, RunDirectory(str(folder)), torch.device(device), prepared.stages, prepared.host, data, True, prepared.recipe.experiment.seed)
    for spec in prepared.loggers:  # the console logger in --quiet mode, as a real run has it
        if spec.name == "console":
            prepared.host.register_run_plugin(spec.instantiate(), "logger:console")
    stage = next(s for s in prepared.stages if s.id == stage_id)
    runner = StageRunner(run, stage, {})
    progress = runner.setup()
    loader = runner.loader(data.train, train=True, generator=runner.state.generator)
    return runner, progress, loader


def bare_loop(runner: StageRunner):
    """What a user would write by hand: the same work, no engine."""
    import copy

    student = copy.deepcopy(runner.state.student)
    device = runner.device
    teacher = runner.state.teacher_taps[0].model
    dataset = runner.run.data.train
    settings = runner.stage.train
    loss_params = runner.state.loss_fn.params
    optimizer = torch.optim.SGD(student.parameters(), lr=settings.optimizer.lr, momentum=settings.optimizer.momentum,
                                weight_decay=settings.optimizer.weight_decay)
    generator = torch.Generator().manual_seed(0)

    def epoch():
        student.train()
        order = torch.randperm(len(dataset), generator=generator).tolist()
        batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
        for images, targets in torch.utils.data.DataLoader(dataset, batch_sampler=batches, pin_memory=device.type == "cuda"):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            logits = student(images)
            with torch.no_grad():
                teacher_logits = teacher(images)
            loss = ops.kd_loss(logits, teacher_logits, temperature=loss_params.temperature, labels=targets, alpha=loss_params.alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return epoch


def engine_loop(runner, progress, loader):
    def epoch():
        runner.train_epoch(1, loader, progress)

    return epoch


def interleaved(functions: dict, rounds: int) -> dict:
    for function in functions.values():  # warm-up
        function()
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            function()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@pytest.fixture(scope="module")
def kd_runner(tmp_path_factory):
    runner, progress, loader = stage_runner(tmp_path_factory.mktemp("bench") / "run", "student-kd")
    yield runner, progress, loader
    runner.close()


def test_engine_overhead(benchmark, kd_runner):
    runner, progress, loader = kd_runner
    engine, bare = engine_loop(runner, progress, loader), bare_loop(runner)
    rounds = 5 if benchmark.enabled else 1
    medians = interleaved({"engine": engine, "bare": bare}, rounds)
    benchmark.extra_info.update({"engine_s": medians["engine"], "bare_s": medians["bare"], "engine_over_bare": medians["engine"] / medians["bare"]})
    benchmark.pedantic(engine, rounds=rounds, iterations=1)


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_teacher_throughput(benchmark, switch, tmp_path):
    if switch == "compile" and not benchmark.enabled:
        pytest.skip("compile warm-up takes about a minute on 2 cores; runs with --benchmark-enable")
    runner, progress, loader = stage_runner(tmp_path / "run", "teacher", SWITCHES[switch])
    epoch = engine_loop(runner, progress, loader)
    epoch()  # warm-up (compilation)
    benchmark.pedantic(epoch, rounds=3 if benchmark.enabled else 1, iterations=1)
    benchmark.extra_info["images"] = len(runner.run.data.train)
    runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--switches", default=",".join(SWITCHES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        runner, progress, loader = stage_runner(Path(folder) / "run", "student-kd", device=args.device)
        medians = interleaved({"engine": engine_loop(runner, progress, loader), "bare": bare_loop(runner)}, args.rounds)
        print(f"KD epoch (quickstart student, {len(runner.run.data.train)} images, torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads)")
        print(f"  engine {medians['engine'] * 1e3:.1f} ms  bare {medians['bare'] * 1e3:.1f} ms  engine/bare {medians['engine'] / medians['bare']:.3f}")
        print("teacher stage throughput (images/s):")
        for index, switch in enumerate(args.switches.split(",")):
            runner, progress, loader = stage_runner(Path(folder) / f"t{index}", "teacher", SWITCHES[switch], device=args.device)
            seconds = interleaved({switch: engine_loop(runner, progress, loader)}, max(3, args.rounds // 2))[switch]
            print(f"  {switch:14s} {len(runner.run.data.train) / seconds:8.0f}")


if __name__ == "__main__":
    sys.exit(main())
