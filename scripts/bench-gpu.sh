#!/usr/bin/env bash
# Record the GPU numbers the CPU benchmarks also measure, on a machine with a CUDA GPU:
# fused KD loss vs eager vs compiled (incl. bandwidth at 4096x32000), engine
# overhead and images/s per speed switch, bench-models latency, and images/s per data
# path and deterministic setting (scripts/bench_pipeline.py).
#   bash scripts/setup.sh --dev && bash scripts/bench-gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench-gpu}
mkdir -p "$out"
python=.venv/bin/python
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())" | tee "$out/device.txt"
"$python" tests/benchmarks/test_bench_kd_loss.py --device cuda --json "$out/kd_loss.json" | tee "$out/kd_loss.txt"
"$python" tests/benchmarks/test_bench_engine.py --device cuda | tee "$out/engine.txt"
.venv/bin/pyramidkd bench-models --device cuda --output "$out" | tee "$out/bench-models.txt"
# Data paths (tensor vs DataLoader) x deterministic on/off: training images/s of SVGG5 and VGG19 at 32 px.
"$python" scripts/bench_pipeline.py --device cuda --json "$out/pipeline.json" | tee "$out/pipeline.txt"
