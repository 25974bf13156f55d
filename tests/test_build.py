"""The installed extension (CI proves the CUDA sources compiled: it has nvcc, no GPU) and scripts/setup.sh."""

from __future__ import annotations

import os

import pytest

from pyramidkd.engine import ops


@pytest.mark.skipif(os.environ.get("PYRAMIDKD_EXPECT_CUDA_BUILD") != "1",
                    reason="set PYRAMIDKD_EXPECT_CUDA_BUILD=1 where the build had nvcc (CI does)")
def test_cuda_kernel_was_compiled_into_the_extension():
    assert ops.fused_available(), ops.fused_unavailable_reason()
    assert ops.fused_cuda_built(), "pyramidkd._C has no CUDA kernel: setup.py did not build csrc/cuda"


@pytest.mark.skipif(os.environ.get("PYRAMIDKD_REQUIRE_FUSED") != "1", reason="set PYRAMIDKD_REQUIRE_FUSED=1 to require the built op")
def test_the_kd_loss_plugin_runs_on_the_fused_op():
    from pyramidkd.plugins.losses.distillation import KDLoss

    assert ops.fused_available(), ops.fused_unavailable_reason()
    assert KDLoss().use_fused


@pytest.mark.skipif(not ops.fused_available(), reason="the extension is not built")
def test_cpu_kernel_is_built_with_openmp():
    """at::parallel_for is an inline `#pragma omp parallel` in ATen's headers:
    compiled without -fopenmp, the CPU kernel silently runs on one thread."""
    import sys

    import torch

    if not (torch.backends.openmp.is_available() and sys.platform.startswith("linux")):
        pytest.skip("torch without OpenMP, or not Linux: setup.py adds -fopenmp only there")
    import pyramidkd._C as ext

    with open(ext.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read(), "pyramidkd._C was compiled without -fopenmp"


def _run_setup_script(tmp_path, *args, fail_on=None):
    """Runs scripts/setup.sh against a stand-in venv whose python fakes pip
    (recording its arguments) and runs everything else with this interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "pip-calls.txt"
    stub = venv / "bin" / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "${1:-}" = "-m" ] && [ "${2:-}" = "pip" ]; then\n'
        f'  echo "${{*:3}}" >> "{calls}"\n'
        f'  [ -n "{fail_on or ""}" ] && [[ "$*" == *"{fail_on}"* ]] && exit 1\n'
        "  exit 0\n"
        "fi\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    stub.chmod(0o755)
    env = dict(os.environ, VENV=str(venv), FORCE_CUDA="0")
    proc = subprocess.run(
        ["bash", str(root / "scripts" / "setup.sh"), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )
    return proc, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.skipif(not ops.fused_available(), reason="the extension is not built")
@pytest.mark.parametrize("dev", [False, True], ids=["runtime", "dev"])
def test_setup_script_says_what_it_does_and_how_long_it_took(tmp_path, dev):
    proc, pip_calls = _run_setup_script(tmp_path, *(["--dev"] if dev else []))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for announced in ("reusing the virtual environment", "installing torch torchvision (≈ 90 s",
                      "installing the build tools", "compiling the fused-loss extension: C++ kernel only",
                      "≈ 1 min on 2 cores", "checking the installation", "fused kd op built"):
        assert announced in out, (announced, out)
    assert out.count("    done in ") == 5  # venv, torch, tools, build, check
    assert "Set-up finished in " in out
    install = pip_calls[-1]
    assert "--no-build-isolation" in install
    if dev:
        assert "editable install" in out and install.endswith("--editable .[dev]")
    else:
        assert "regular install" in out and "--editable" not in install and install.endswith(" .")


@pytest.mark.skipif(not ops.fused_available(), reason="the extension is not built")
def test_setup_script_names_the_step_that_failed(tmp_path):
    proc, _ = _run_setup_script(tmp_path, fail_on="--no-build-isolation")
    assert proc.returncode != 0
    assert "setup.sh: failed while installing pyramidkd" in proc.stderr
    assert "Set-up finished" not in proc.stdout
