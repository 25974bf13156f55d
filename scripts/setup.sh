#!/usr/bin/env bash
# Create ./.venv and install pyramidkd into it, compiling the fused-loss
# extension (C++ always, CUDA when nvcc is found) against the installed torch.
#
#   bash scripts/setup.sh          # runtime only (a regular, non-editable install)
#   bash scripts/setup.sh --dev    # editable, plus the test and benchmark tools:
#                                  # an edit under engine/ or plugins/ is live at once;
#                                  # after an edit under csrc/ run this again
#
# Environment: PYTHON (default python3), VENV (default .venv),
# TORCH_SPEC (default "torch torchvision": any recent release works),
# FORCE_CUDA (1: build the CUDA kernel, 0: CPU only; default: when nvcc is found),
# MAX_JOBS (parallel compile jobs, default 2).
#
# Each step says what it does and how long it took; pip itself stays quiet (-q).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
editable=()
if [ "${1:-}" = "--dev" ]; then extras="[dev]"; editable=(--editable); fi
python=${PYTHON:-python3}
venv=${VENV:-.venv}
torch_spec=${TORCH_SPEC:-torch torchvision}
max_jobs=${MAX_JOBS:-2}

# ---- progress messages: what each step does, and how long it took
duration() {  # seconds -> "42 s" or "3 min 05 s"
    if [ "$1" -ge 60 ]; then printf '%d min %02d s' $(($1 / 60)) $(($1 % 60)); else printf '%d s' "$1"; fi
}
step_name=""
step_started=$SECONDS
step() {  # step "what happens now" ... finish_step
    step_name=$1
    step_started=$SECONDS
    echo "==> $step_name"
}
finish_step() {
    if [ -n "$step_name" ]; then echo "    done in $(duration $((SECONDS - step_started)))"; fi
    step_name=""
}
trap 'echo "setup.sh: failed while ${step_name:-starting}" >&2' ERR

# Which kernels the build will compile, to give an honest estimate; setup.py
# decides for real (same rules: FORCE_CUDA, else nvcc found and a CUDA torch).
cuda_build_expected() {
    case "${FORCE_CUDA:-}" in 1) return 0 ;; 0) return 1 ;; esac
    local cuda_home=${CUDA_HOME:-${CUDA_PATH:-/usr/local/cuda}}
    if [ ! -x "$cuda_home/bin/nvcc" ] && ! command -v nvcc >/dev/null 2>&1; then return 1; fi
    # torch/version.py, read without importing torch (which takes seconds)
    "$venv/bin/python" - 2>/dev/null <<'PY'
import importlib.util, os, runpy, sys
spec = importlib.util.find_spec("torch")
sys.exit(runpy.run_path(os.path.join(os.path.dirname(spec.origin), "version.py")).get("cuda") is None)
PY
}

echo "Setting up pyramidkd in $venv ($([ -n "$extras" ] && echo "development: editable install with the test tools" || echo "runtime install"))"

if [ -x "$venv/bin/python" ]; then
    step "reusing the virtual environment $venv"
else
    step "creating the virtual environment $venv with $python"
    "$python" -m venv "$venv"
fi
finish_step
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# torch first: the extension is built against it (no build isolation), so any
# installed torch version works; the build tools come next.
step "installing $torch_spec (≈ 90 s from a local mirror, longer from PyPI: the wheels are large; quick if already installed)"
# shellcheck disable=SC2086
"${pip[@]}" install $torch_spec
finish_step

step "installing the build tools (setuptools, wheel, ninja, pybind11)"
"${pip[@]}" install "setuptools>=64" wheel ninja pybind11
finish_step

if cuda_build_expected; then
    kernels="C++ and CUDA kernels (≈ 2 min on 2 idle cores, more under load; FORCE_CUDA=0 skips CUDA)"
else
    kernels="C++ kernel only (no nvcc, a CPU-only torch or FORCE_CUDA=0; ≈ 1 min on 2 cores)"
fi
if [ -n "$extras" ]; then
    install_kind="editable install with the test tools: edits under engine/ and plugins/ are live, the extension lands in package/"
else
    install_kind="regular install"
fi
step "installing pyramidkd ($install_kind) and compiling the fused-loss extension: $kernels, MAX_JOBS=$max_jobs"
# With no GPU to query, setup.py targets sm_80 and sm_90 (+PTX) unless
# TORCH_CUDA_ARCH_LIST says otherwise; MAX_JOBS keeps the build inside small machines.
# --dev: the extension is compiled in place (package/_C*.so, ignored by git).
MAX_JOBS=$max_jobs "${pip[@]}" install --no-build-isolation "${editable[@]}" ".$extras"
finish_step

step "checking the installation"
"$venv/bin/python" - <<'PY'
import pyramidkd
from pyramidkd.engine import ops
state = "built" if ops.fused_available() else f"NOT available ({ops.fused_unavailable_reason()})"
cuda = " with its CUDA kernel" if ops.fused_cuda_built() else ""
print(f"    pyramidkd {pyramidkd.__version__} installed; fused kd op {state}{cuda}")
PY
finish_step
echo "Set-up finished in $(duration "$SECONDS")."
