"""Data-path benchmarks (issue 13): the tensor pipeline against the ``DataLoader`` one.

* Batch making alone: 9,000 CIFAR-shaped images (random uint8 pixels, 32×32), a
  4-pixel padded random crop, a horizontal flip and normalisation, batch 64, 2
  threads: the tensor path (``TensorBatches`` over a ``TensorSplit``) against a
  ``DataLoader`` over PIL images through torchvision's transforms, as the
  ``cifar10`` plugin feeds it (``Image.fromarray`` per sample, ``RandomCrop``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``). Target: ≥ 50k images/s
  on the tensor path.
* A student stage: one training epoch of SVGG5 (width 0.125, batch norm) on the
  same 9,000 images through the engine's stage loop, ``pipeline = "tensor"``
  against ``"dataloader"``. Target: dataloader / tensor ≥ 1.5.

    pytest tests/benchmarks/test_bench_data.py --benchmark-enable
    python tests/benchmarks/test_bench_data.py [--rounds 5] [--threads 2]   # the ratio table

Under the default ``--benchmark-disable`` each case runs once, on 1,024 images, as a
smoke test. Both paths run interleaved in one process, so a machine busy with
something else slows both alike; the ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import attrs
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pyramidkd import testing
from pyramidkd.engine import Augmentation, DataSplits, Dataset, TensorSplit, TrainSection
from pyramidkd.engine.data.batches import make_loader
from pyramidkd.engine.data.pipeline import load_run_data
from pyramidkd.engine.distributed import World
from pyramidkd.engine.rundir import RunDirectory
from pyramidkd.engine.runner import Run, dataset_context, prepare
from pyramidkd.engine.training.loop import StageRunner

pytestmark = pytest.mark.benchmark_suite

IMAGES, SMOKE_IMAGES, BATCH, PADDING = 9_000, 1_024, 64, 4
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def cifar_like(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (count,), generator=generator))


class PilImages(torch.utils.data.Dataset):
    """Pixels held as an [N, H, W, C] uint8 array; each sample a PIL image through
    ``transform`` (what torchvision's CIFAR10 reader does)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.pixels = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.pixels[index])), int(self.labels[index])


def per_sample_transforms(train: bool):
    augment = [T.RandomCrop(32, padding=PADDING), T.RandomHorizontalFlip()] if train else []
    return T.Compose(augment + [T.ToTensor(), T.Normalize(*CIFAR10_STATS)])


@attrs.define
class BenchParams:
    count: int = IMAGES


class BenchCifar(Dataset):
    """``count`` random CIFAR-shaped training images (plus 512 val / 512 test), on either path."""

    name = "bench-cifar"
    Params = BenchParams

    def parts(self):
        images, labels = cifar_like(self.params.count + 1024)
        count = self.params.count
        return [(images[:count], labels[:count]), (images[count:count + 512], labels[count:count + 512]),
                (images[count + 512:], labels[count + 512:])]

    def load(self, context):
        (train, val, test) = self.parts()
        return DataSplits(PilImages(*train, per_sample_transforms(True)), PilImages(*val, per_sample_transforms(False)),
                          PilImages(*test, per_sample_transforms(False)), 10, (3, 32, 32))

    def load_tensors(self, context):
        splits = [TensorSplit(images, labels, *CIFAR10_STATS) for images, labels in self.parts()]
        return DataSplits(*splits, 10, (3, 32, 32), augmentation=Augmentation(PADDING, True))


PLUGIN = testing.plugin_module("bench_data", pyramidkd_register_datasets=lambda: [BenchCifar])

RECIPE = """
[experiment]
name = "bench-data"
seed = 0
device = "cpu"

[dataset]
name = "bench-cifar"
count = {count}

[train]
epochs = 1
batch_size = 64
eval_batch_size = 500
pipeline = "{pipeline}"
optimizer = {{ name = "sgd", lr = 0.05 }}

[[stages]]
id = "svgg5"
scheme = "scratch"
model = {{ name = "svgg5", width = 0.125, batch_norm = true }}
"""


# --- what is timed ----------------------------------------------------------------


def batch_maker(pipeline: str, count: int):
    """One epoch of training batches (nothing trained) on ``pipeline``."""
    images, labels = cifar_like(count)
    settings = TrainSection(batch_size=BATCH, pipeline=pipeline)
    if pipeline == "tensor":
        dataset = TensorSplit(images, labels, *CIFAR10_STATS)
    else:
        dataset = PilImages(images, labels, per_sample_transforms(True))
    loader = make_loader(dataset, settings, World(), torch.device("cpu"), train=True, generator=torch.Generator().manual_seed(0),
                         augmentation=Augmentation(PADDING, True))

    def epoch():
        for images, _ in loader.epoch():
            assert images.dtype == torch.float32
    return epoch


def stage_epoch(folder: Path, pipeline: str, count: int):
    """One training epoch of the SVGG5 stage through the engine's loop on ``pipeline``."""
    recipe = folder / f"{pipeline}.toml"
    recipe.write_text(RECIPE.format(count=count, pipeline=pipeline))
    with testing.autoload(False):
        prepared = prepare(str(recipe), extra_plugins=[PLUGIN])
    device = torch.device("cpu")
    data, choice, _ = load_run_data(prepared.dataset, dataset_context(prepared.recipe), prepared.pipeline, device, World())
    run = Run(prepared.recipe, RunDirectory(str(folder / pipeline)), device, prepared.stages, prepared.host, data, True, 0,
              pipeline=choice.pipeline)
    runner = StageRunner(run, prepared.stages[0], {})
    progress = runner.setup()
    loader = runner.loader(data.train, train=True, generator=runner.state.generator)

    def epoch():
        runner.train_epoch(1, loader, progress)
    return epoch


def interleaved(functions: dict, rounds: int) -> dict:
    """Median seconds of each function, the functions taking turns (after a warm-up)."""
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# --- pytest-benchmark ---------------------------------------------------------------


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("pipeline", ["tensor", "dataloader"])
def test_batch_making(benchmark, pipeline, two_threads):
    count = IMAGES if benchmark.enabled else SMOKE_IMAGES
    epoch = batch_maker(pipeline, count)
    benchmark.extra_info["images"] = count
    benchmark.pedantic(epoch, rounds=5 if benchmark.enabled else 1, iterations=1, warmup_rounds=1 if benchmark.enabled else 0)


@pytest.mark.parametrize("pipeline", ["tensor", "dataloader"])
def test_student_stage_epoch(benchmark, pipeline, tmp_path, two_threads):
    count = IMAGES if benchmark.enabled else SMOKE_IMAGES
    epoch = stage_epoch(tmp_path, pipeline, count)
    benchmark.extra_info["images"] = count
    benchmark.pedantic(epoch, rounds=3 if benchmark.enabled else 1, iterations=1, warmup_rounds=1 if benchmark.enabled else 0)


# --- the ratio table -----------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=IMAGES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.images} CIFAR-shaped images, batch {BATCH}, pad-{PADDING} crop + flip + normalise, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    medians = interleaved({p: batch_maker(p, args.images) for p in ("tensor", "dataloader")}, args.rounds)
    rates = {p: args.images / s for p, s in medians.items()}
    print(f"batch making:   tensor {rates['tensor']:9.0f} images/s   dataloader {rates['dataloader']:7.0f} images/s   "
          f"tensor / dataloader {rates['tensor'] / rates['dataloader']:.1f}x   (target: tensor >= 50000 images/s)")
    with tempfile.TemporaryDirectory() as folder:
        medians = interleaved({p: stage_epoch(Path(folder), p, args.images) for p in ("tensor", "dataloader")}, max(3, args.rounds // 2))
    print(f"SVGG5 epoch:    tensor {medians['tensor']:7.2f} s   dataloader {medians['dataloader']:7.2f} s   "
          f"dataloader / tensor {medians['dataloader'] / medians['tensor']:.2f}x   (target: >= 1.5x)")


if __name__ == "__main__":
    sys.exit(main())
