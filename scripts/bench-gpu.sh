#!/usr/bin/env bash
# The GPU check: one script, ≤ 8 minutes on one H100/H200, everything into one folder.
#
#   bash scripts/bench-gpu.sh [OUT_DIR]          # default runs/bench-gpu
#
# It records, each step with its own time limit so that one hang cannot eat the
# lease (steps.tsv: step, exit code, seconds):
#   env.txt            GPU, driver, torch, nvcc
#   build.txt          the extension built for this GPU (skipped when already built with CUDA)
#   cuda-tests.txt     the CUDA test matrix, pass/fail per test (+ cuda-tests.xml)
#   kd_kernels.txt     the fused loss's forward and backward CUDA kernels at (4096, 32000):
#                      GB/s of the bytes they must move, share of the GPU's peak (target 80 %)
#   kd_loss.txt/json   fused vs eager vs compiled KD loss, (4096, 32000) fp32 and bf16
#   quickstart.txt     recipes/quickstart.toml end to end on the GPU (tensor path)
#   pipeline.txt/json  training images/s of SVGG5 and VGG19 at 32 px: deterministic on/off, bf16
#   torchrun.txt       a 2-process NCCL run, when two GPUs are visible
#
# Nothing is downloaded: with no ./.venv it uses the machine's python3 (a lent GPU
# machine has torch, torchvision, numpy, scikit-learn, pluggy, attrs, safetensors)
# and installs pyramidkd with --no-deps --no-index. The real CIFAR-10 archive is read
# from $ARCHIVE (default ../shared/data/cifar10-jpeg.tar.gz, else
# .gpu-carry/cifar10-jpeg.tar.gz: copy it there and name .gpu-carry in the device
# tool's carry, as docs/gpu.md shows).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench-gpu}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=${PYTHON:-python3}; fi
archive=${ARCHIVE:-}
for candidate in ../shared/data/cifar10-jpeg.tar.gz .gpu-carry/cifar10-jpeg.tar.gz; do
    if [ -z "$archive" ] && [ -f "$candidate" ]; then archive=$candidate; fi
done
export PYTHONUNBUFFERED=1 CUDA_DEVICE_ORDER=PCI_BUS_ID
started=$SECONDS
printf 'step\texit\tseconds\n' >"$out/steps.tsv"

# run_step NAME LIMIT_S COMMAND...: output to NAME.txt, status to steps.tsv; never stops the
# script. A step's limit is cut to what is left of the whole budget (BENCH_BUDGET_S, 470 s:
# the ≤ 8 minutes a lease allows, less the start-up), and a step with under 15 s left is skipped.
budget=${BENCH_BUDGET_S:-470}
run_step() {
    local name=$1 limit=$2 t0=$SECONDS rc left
    shift 2
    left=$((budget - (SECONDS - started)))
    if [ "$left" -lt 15 ]; then
        printf '%s	skipped (time budget spent)	0\n' "$name" >>"$out/steps.tsv"; echo "==> $name: skipped (time budget spent)"
        return 0
    fi
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    echo "==> $name (limit ${limit} s, $((SECONDS - started)) s so far)"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.txt" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$out/steps.tsv"
    tail -n 4 "$out/$name.txt" | sed 's/^/    /'
    return 0
}

run_step env 30 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv;
    $python -c 'import sys, torch; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())';
    (command -v nvcc >/dev/null && nvcc --version | tail -n 2) || echo 'no nvcc'"
if ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "bench-gpu: no CUDA GPU visible to $python; see $out/env.txt" >&2
    exit 1
fi

# The extension, built for this GPU's architecture only (fast), unless already built with CUDA.
if "$python" -c "import sys; from pyramidkd.engine import ops; sys.exit(not ops.fused_cuda_built())" 2>/dev/null; then
    printf 'build\t0\t0\n' >>"$out/steps.tsv"; echo "==> build: the CUDA kernel is already built"
else
    arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    run_step build 240 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" FORCE_CUDA=1 \
        "$python" -m pip install --no-build-isolation --no-deps --no-index --editable .
fi

run_step cuda-tests 100 "$python" -m pytest -m cuda -p no:cacheprovider -q -rA --junitxml="$out/cuda-tests.xml" tests
# The two KD-loss kernels alone at 4096x32000 (CUDA events; share of the GPU's peak HBM
# bandwidth, PEAK_GBPS: 4800 for an H200, 3350 for an H100 SXM), then fused vs eager vs compiled.
peak=${PEAK_GBPS:-$("$python" -c "import torch; n = torch.cuda.get_device_name(); print(4800 if 'H200' in n else 3350 if 'H100' in n else 0)")}
run_step kd_kernels 40 "$python" tests/benchmarks/test_bench_kd_loss.py --device cuda --kernels-only --dtype fp32 --dtype bf16 --peak-gbps "$peak"
run_step kd_loss 110 "$python" tests/benchmarks/test_bench_kd_loss.py --device cuda --dtype fp32 --dtype bf16 --json "$out/kd_loss.json"
run_step quickstart 60 "$python" -m pyramidkd.engine.cli run recipes/quickstart.toml --set 'experiment.device="cuda"' \
    --set 'train.pipeline="tensor"' --output "$out/quickstart-run" --force
if [ -n "$archive" ]; then
    run_step pipeline 150 "$python" scripts/bench_pipeline.py --device cuda --archive "$archive" --pipelines tensor \
        --deterministic true,false --precisions fp32,bf16 --epochs 3 --json "$out/pipeline.json"
else
    printf 'pipeline\tskipped (no CIFAR-10 archive)\t0\n' >>"$out/steps.tsv"
fi
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
    run_step torchrun 90 "$python" -m torch.distributed.run --standalone --nproc-per-node 2 -m pyramidkd.engine.cli run \
        recipes/quickstart.toml --set 'experiment.device="cuda"' --output "$out/torchrun-run" --force
else
    printf 'torchrun\tskipped (%s GPU visible)\t0\n' "$gpus" >>"$out/steps.tsv"
fi
rm -rf "$out/quickstart-run/checkpoints" "$out/torchrun-run/checkpoints"  # keep the records, not the weights
echo "bench-gpu: done in $((SECONDS - started)) s; results in $out (steps.tsv)"
column -t -s $'\t' "$out/steps.tsv"
