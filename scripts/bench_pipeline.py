"""Training images/s of SVGG5 and VGG19 at 32 px for each data path, each
``deterministic`` setting and each precision, through the engine's own stage loop
(``pyramidkd run``).

Data: the real CIFAR-10 JPEGs (``../shared/data/cifar10-jpeg.tar.gz``, or
``--archive``), 10,000 training images, 4-pixel padded crops and flips. Each
configuration trains ``--epochs`` epochs from scratch; the first is a warm-up
(cuDNN autotuning, caches), images/s comes from the fastest later epoch's training
time (``train_time_s`` in ``metrics.jsonl``).

    python scripts/bench_pipeline.py --device cuda --json runs/bench-gpu/pipeline.json
    python scripts/bench_pipeline.py --device cpu --models svgg5 --width 0.125 --epochs 2   # a CPU check
    python scripts/bench_pipeline.py --pipelines tensor --precisions fp32,bf16   # what bench-gpu.sh runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """
loggers = ["files"]

[experiment]
name = "bench-pipeline"
seed = 0
device = "{device}"
deterministic = {deterministic}
threads = {threads}

[dataset]
name = "imagefolder"
archive = "{archive}"
image_size = 32
limit = {limit}
normalization = "imagenet"

[train]
epochs = {epochs}
batch_size = {batch_size}
pipeline = "{pipeline}"
precision = "{precision}"
num_workers = {workers}
optimizer = {{ name = "sgd", lr = 0.05 }}

[[stages]]
id = "bench"
scheme = "scratch"
model = {{ name = "{model}", width = {width}, batch_norm = true }}
"""


def measure(args, model: str, pipeline: str, deterministic: bool, precision: str, folder: Path) -> dict:
    from pyramidkd.engine.runner import run_recipe

    name = f"{model}-{pipeline}-{'det' if deterministic else 'fast'}-{precision}"
    recipe = folder / f"{name}.toml"
    recipe.write_text(RECIPE.format(
        device=args.device, deterministic=str(deterministic).lower(), threads=args.threads, archive=args.archive,
        limit=args.limit, epochs=args.epochs, batch_size=args.batch_size, pipeline=pipeline, precision=precision,
        workers=args.workers if pipeline == "dataloader" else 0, model=model, width=args.width,
    ))
    output = folder / name
    summary = run_recipe(str(recipe), output=str(output), quiet=True)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    timed = epochs[1:] or epochs  # the first epoch warms up
    train_images = summary["dataset"]["train"]
    best = min(r["train_time_s"] for r in timed)
    return {"model": model, "pipeline": pipeline, "deterministic": deterministic, "precision": precision, "train_images": train_images,
            "train_time_s": best, "images_per_s": train_images / best, "test_acc": summary["stages"][0]["test_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="svgg5,vgg19")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--pipelines", default="tensor,dataloader", help="data paths to measure, comma-separated")
    parser.add_argument("--deterministic", default="true,false", help="deterministic settings to measure")
    parser.add_argument("--precisions", default="fp32", help="train.precision values to measure (fp32, bf16, fp16)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers on the dataloader path")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not Path(args.archive).is_file():
        sys.exit(f"bench_pipeline: {args.archive} not found; pass --archive PATH (the CIFAR-10 JPEG tar.gz)")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        grid = itertools.product(args.models.split(","), args.pipelines.split(","),
                                 [value.strip() == "true" for value in args.deterministic.split(",")], args.precisions.split(","))
        for model, pipeline, deterministic, precision in grid:
            row = measure(args, model, pipeline, deterministic, precision, Path(scratch))
            rows.append(row)
            print(f"{model:6s} {pipeline:10s} deterministic={str(deterministic).lower():5s} {precision:4s} "
                  f"{row['images_per_s']:10.0f} images/s  (epoch {row['train_time_s']:.2f} s, test {100 * row['test_acc']:.1f} %)",
                  flush=True)
            if args.json:  # after every row: a run cut short by a time limit keeps what it measured
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
