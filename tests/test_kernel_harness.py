"""The CUDA kernel's row logic, run on the CPU.

csrc/cuda/kd_loss_row.cuh holds the per-thread code of the CUDA kernel (online
state, merge, rescale, per-element absorb and gradient formulas) as
``__host__ __device__`` functions; csrc/harness/kd_row_harness.cpp drives them
in the kernels' exact order (each lane's strided slice with the vector-pack /
head / tail split, the xor butterfly across 32 lanes, the merge across warps)
for any block size.  It is compiled here with the host C++ compiler and
checked against the CPU op (the reference: it takes the row max first) over
the CPU kernel's numeric test matrix.  No GPU and no nvcc needed.

``PYRAMIDKD_HARNESS_INCLUDE=dir`` puts ``dir`` first on the include path, to
replay another version of kd_loss_row.cuh (e.g. the one before a fix).
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pyramidkd.engine import ops

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "harness" / "kd_row_harness.cpp"

if not ops.fused_available():
    if os.environ.get("PYRAMIDKD_REQUIRE_FUSED") == "1":
        raise RuntimeError(f"fused kd_loss required but unavailable: {ops.fused_unavailable_reason()}")
    pytest.skip(f"the CPU reference op is unavailable: {ops.fused_unavailable_reason()}", allow_module_level=True)

CS = [1, 2, 7, 31, 33, 100, 1000, 1024, 1025, 4097, 5003, 32000]
TS = [0.5, 1.0, 4.0, 20.0, 100.0]
VEC = {torch.float32: 4, torch.bfloat16: 8}  # the kernel's 16-byte pack


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++ / c++) to build the harness")
    out = tmp_path_factory.mktemp("harness") / "libkdharness.so"
    includes = [f"-I{d}" for d in filter(None, [os.environ.get("PYRAMIDKD_HARNESS_INCLUDE")])]
    includes.append(f"-I{ROOT / 'csrc' / 'cuda'}")
    # No -ffast-math: -inf and NaN must behave as on the GPU.
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fno-strict-aliasing", *includes, str(SOURCE), "-o", str(out)]
    subprocess.run(cmd, check=True, timeout=300)
    lib = ctypes.CDLL(str(out))
    lib.kd_harness_run.restype = ctypes.c_int
    return lib


def _ptr(x):
    return None if x is None else ctypes.c_void_p(x.data_ptr())


def run_harness(lib, s, t, T, labels=None, alpha=1.0, ignore_index=-100, grad_output=1.0, threads=-1, vec=4):
    """Loss, grad_s, grad_t (float32, or the logits' dtype) as the CUDA kernels compute them.

    threads: -1 the kernel's own choice, 0 the warp-per-row kernel, else the
    block-per-row kernel with that many threads."""
    dtype = s.dtype
    sf, tf = s.float().contiguous(), t.float().contiguous()
    B, C = sf.shape
    gs, gt, stats = torch.empty(B, C), torch.empty(B, C), torch.empty(B, 8)
    loss = ctypes.c_double()
    lab = None if labels is None else labels.contiguous()
    rc = lib.kd_harness_run(
        _ptr(sf), _ptr(tf), ctypes.c_int64(B), ctypes.c_int64(C), _ptr(lab), ctypes.c_int64(ignore_index),
        ctypes.c_double(T), ctypes.c_double(alpha), ctypes.c_double(grad_output), ctypes.c_int(threads),
        ctypes.c_int(vec), _ptr(gs), _ptr(gt), _ptr(stats), ctypes.byref(loss),
    )
    assert rc != 1, "bad harness arguments"
    assert rc == 0, "a warp butterfly left its lanes with different states (the merge is not symmetric)"
    return torch.tensor(loss.value, dtype=torch.float64), gs.to(dtype), gt.to(dtype)


def cpu_op(s, t, T, labels=None, alpha=1.0, ignore_index=-100, grad_output=1.0):
    loss, gs, gt = torch.ops.pyramidkd.kd_loss_fwd(s, t, labels, T, alpha, ignore_index, True, True)
    return loss.double(), (gs.float() * grad_output).to(s.dtype), (gt.float() * grad_output).to(s.dtype)


def layouts(C, vec):
    """(threads, vec) pairs: the kernel's own choice, both kernels at other
    block sizes, and the unaligned (scalar) fallback."""
    out = [(-1, vec), (-1, 1), (0, vec)]
    out += [(th, vec) for th in (32, 96, 1024)]  # 96: three warps, 29 empty partials
    return out if C > 1 else out[:3]


def logits(B, C, dtype, seed, scale=3.0, masked=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g) * scale
    t = torch.randn(B, C, generator=g) * scale
    if masked:  # masked teacher classes: random ones, a run longer than a warp's slice, one nearly-empty row
        t[torch.rand(B, C, generator=g) < 0.3] = float("-inf")
        t[:, C // 3 : C // 3 + min(C // 2, 400)] = float("-inf")
        t[0, 1:-1] = float("-inf")  # two finite classes: most lanes see only -inf
        t[:, 0] = t[:, 0].clamp_min(-1.0)  # every row keeps a finite teacher logit
        t[0, -1] = 0.5
    return s.to(dtype), t.to(dtype)


def labels_for(B, C, seed):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[::3] = -100
    return labels


def assert_matches(got, want, T, dtype):
    loss, gs, gt = got
    ref_loss, ref_gs, ref_gt = want
    rtol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=2e-6 * max(1.0, T * T))
    for a, b in ((gs, ref_gs), (gt, ref_gt)):
        scale = b.float().abs().max().item()
        g_rtol = 1e-3 if dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(a.float(), b.float(), rtol=g_rtol, atol=3e-4 * scale + 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("C", CS)
def test_kernel_logic_matches_cpu_op(harness, C, dtype):
    for B, masked in ((1, False), (3, False), (3, True)):
        s, t = logits(B, C, dtype, seed=C + B, masked=masked and C > 2)
        labels = labels_for(B, C, seed=C)
        for threads, vec in layouts(C, VEC[dtype]):
            for T in TS:
                want = cpu_op(s, t, T)
                assert_matches(run_harness(harness, s, t, T, threads=threads, vec=vec), want, T, dtype)
            # labels (some ignored), alpha mixing, grad_output != 1 folded into the kernel
            args = dict(labels=labels, alpha=0.3, grad_output=-2.5)
            want = cpu_op(s, t, 2.0, **args)
            assert_matches(run_harness(harness, s, t, 2.0, threads=threads, vec=vec, **args), want, 2.0, dtype)


def test_teacher_masked_class_counts_as_zero(harness):
    """The case a hand replay of the old kernel got wrong (CPU 5.02346, CUDA NaN):
    a thread whose slice holds only -inf teacher logits."""
    g = torch.Generator().manual_seed(0)
    for B, C in [(3, 7), (4, 1025)]:
        s = torch.randn(B, C, generator=g, dtype=torch.float64).float() * 3
        t = torch.randn(B, C, generator=g, dtype=torch.float64).float() * 3
        t[:, 1] = float("-inf")
        t[0, C - 1] = float("-inf")
        for T in (1.0, 4.0):
            for threads in (-1, 0, 128):
                loss, gs, gt = run_harness(harness, s, t, T, threads=threads)
                assert math.isfinite(loss.item()) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
                ref = cpu_op(s, t, T)
                assert_matches((loss, gs, gt), ref, T, torch.float32)
                assert gt[:, 1].abs().max() == 0 and gt[0, C - 1] == 0  # p = 0 exactly


def test_student_minus_inf_under_finite_teacher_is_infinite(harness):
    s, t = logits(2, 300, torch.float32, seed=5)
    s[1, 7] = float("-inf")
    s[1, 100:180] = float("-inf")  # whole lane slices of -inf student logits
    for threads in (-1, 0, 1024):
        loss, _, _ = run_harness(harness, s, t, 2.0, threads=threads)
        assert loss.item() == float("inf") == cpu_op(s, t, 2.0)[0].item()


def test_classes_masked_in_both_drop_out(harness):
    """-inf in student and teacher at the same classes (p = 0): the CUDA logic
    gives the loss of the other classes alone (the CPU kernel gives inf here,
    F.kl_div nan; see docs/fused-loss.md)."""
    s, t = logits(3, 2000, torch.float32, seed=9)
    keep = torch.ones(2000, dtype=torch.bool)
    keep[500:1500] = False
    keep[3] = False
    s[:, ~keep] = float("-inf")
    t[:, ~keep] = float("-inf")
    want = cpu_op(s[:, keep].contiguous(), t[:, keep].contiguous(), 4.0)
    for threads in (-1, 0, 64):
        loss, gs, gt = run_harness(harness, s, t, 4.0, threads=threads, vec=1)  # vec=1: the kept columns' split
        torch.testing.assert_close(loss, want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gs[:, keep], want[1], rtol=1e-3, atol=1e-7)
        assert (gs[:, ~keep] == 0).all() and (gt[:, ~keep] == 0).all()


def test_identical_and_huge_logits(harness):
    for C in (7, 1025, 4097):
        s, t = logits(4, C, torch.float32, seed=C)
        for threads in (-1, 0, 256):
            loss, gs, gt = run_harness(harness, s, s, 4.0, threads=threads)
            assert loss.item() == 0.0 and gs.abs().max() == 0 and gt.abs().max() == 0
        big_s, big_t = s.sign() * 1e4, t.sign() * 1e4
        labels = labels_for(4, C, seed=C)
        for T in (0.5, 4.0):
            got = run_harness(harness, big_s, big_t, T, labels=labels, alpha=0.5)
            assert all(torch.isfinite(x).all() for x in got)
            torch.testing.assert_close(got[0], cpu_op(big_s, big_t, T, labels=labels, alpha=0.5)[0], rtol=1e-3, atol=1e-3)


def test_out_of_range_label_poisons_its_row_not_the_context(harness):
    """The kernel no longer device-asserts (a sticky error that kills the CUDA
    context): the bad row's loss and gradient are NaN, the other rows intact."""
    s, t = logits(3, 50, torch.float32, seed=1)
    labels = torch.tensor([0, 50, -100])
    loss, gs, gt = run_harness(harness, s, t, 2.0, labels=labels, alpha=0.5)
    assert math.isnan(loss.item())
    assert torch.isnan(gs[1]).all() and torch.isfinite(gs[0]).all() and torch.isfinite(gs[2]).all()
    assert torch.isfinite(gt[0]).all() and torch.isfinite(gt[2]).all()


def test_all_labels_ignored_and_alpha_zero(harness):
    s, t = logits(5, 9, torch.float32, seed=2)
    ignored = torch.full((5,), -1)
    got = run_harness(harness, s, t, 3.0, labels=ignored, alpha=0.25, ignore_index=-1)
    assert_matches(got, cpu_op(s, t, 3.0, labels=ignored, alpha=0.25, ignore_index=-1), 3.0, torch.float32)
    labels = labels_for(5, 9, seed=3)
    got = run_harness(harness, s, t, 4.0, labels=labels, alpha=0.0)
    assert_matches(got, cpu_op(s, t, 4.0, labels=labels, alpha=0.0), 4.0, torch.float32)


def test_the_gpu_runs_the_tested_code():
    """The .cu file takes its row logic from the header the harness tests (no
    private copy of it), and the harness mirrors the kernels' launch geometry."""
    import re

    cu = (ROOT / "csrc" / "cuda" / "kd_loss_cuda.cu").read_text()
    harness_src = SOURCE.read_text()
    assert '#include "kd_loss_row.cuh"' in cu and '#include "kd_loss_row.cuh"' in harness_src
    for fn in ("rescale", "merge", "absorb", "accumulate_row", "grad_elem", "write_grads_row", "split_row"):
        assert not re.search(rf"\b{fn}\s*\([^;]*\)\s*\{{", cu), f"kd_loss_cuda.cu defines its own {fn}()"
    for name in ("kWarpMaxC", "kGradThreads"):
        pattern = rf"constexpr\s+\w+\s+{name}\s*=\s*(\d+)"
        assert re.search(pattern, cu).group(1) == re.search(pattern, harness_src).group(1), name
    # the block size choice of launch_stats, replayed by auto_threads()
    rule = "while (threads < 1024 && static_cast<int64_t>(threads) * 4 < packs) threads *= 2;"
    assert rule in cu and rule in harness_src
