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
