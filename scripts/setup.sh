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
# TORCH_SPEC (default "torch torchvision": any recent release works).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
editable=()
if [ "${1:-}" = "--dev" ]; then extras="[dev]"; editable=(--editable); fi
python=${PYTHON:-python3}
venv=${VENV:-.venv}

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# torch first: the extension is built against it (no build isolation), so any
# installed torch version works; the build tools come next.
# shellcheck disable=SC2086
"${pip[@]}" install ${TORCH_SPEC:-torch torchvision}
"${pip[@]}" install "setuptools>=64" wheel ninja pybind11

# With no GPU to query, setup.py targets sm_80 and sm_90 (+PTX) unless
# TORCH_CUDA_ARCH_LIST says otherwise; MAX_JOBS keeps the build inside small machines.
# --dev: the extension is compiled in place (package/_C*.so, ignored by git).
MAX_JOBS=${MAX_JOBS:-2} "${pip[@]}" install --no-build-isolation "${editable[@]}" ".$extras"
"$venv/bin/python" - <<'PY'
import pyramidkd
from pyramidkd.engine import ops
state = "built" if ops.fused_available() else f"NOT available ({ops.fused_unavailable_reason()})"
print(f"pyramidkd {pyramidkd.__version__} installed; fused kd op {state}")
PY
