"""The installed extension: CI proves the CUDA sources compiled (it has nvcc, no GPU)."""

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
