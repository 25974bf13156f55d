"""Tests of the fused distillation loss (pyramidkd._C / pyramidkd.engine.ops).

The fused op is checked against the textbook formula
``F.kl_div(F.log_softmax(s/T, 1), F.softmax(t/T, 1), reduction="batchmean") * T*T``
(+ (1-alpha) * CE), evaluated in float64.  CUDA cases run only where a GPU is
visible.  When the extension is not built the module is skipped, unless
PYRAMIDKD_REQUIRE_FUSED=1 (CI) turns that into a failure.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pyramidkd.engine import ops

if not ops.fused_available():
    if os.environ.get("PYRAMIDKD_REQUIRE_FUSED") == "1":
        raise RuntimeError(f"fused kd_loss required but unavailable: {ops.fused_unavailable_reason()}")
    pytest.skip(f"fused kd_loss unavailable: {ops.fused_unavailable_reason()}", allow_module_level=True)

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")]),
]

BS = [1, 3, 256]
CS = [1, 2, 7, 100, 1024, 1025, 4097]
TS = [0.5, 1.0, 4.0, 20.0]


def textbook(s, t, T, labels=None, alpha=1.0, ignore_index=-100):
    """The formula of the issue, in whatever dtype s and t have.

    The CE term is F.cross_entropy's mean over non-ignored rows, except that a
    batch whose labels are all ignored contributes 0 (documented convention;
    F.cross_entropy would give nan).
    """
    kd = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
    if labels is None:
        return kd
    if bool((labels == ignore_index).all()):
        return alpha * kd
    return alpha * kd + (1 - alpha) * F.cross_entropy(s, labels, ignore_index=ignore_index)


def reference(s, t, T, labels=None, alpha=1.0, ignore_index=-100, grad_output=1.0):
    """float64 loss and gradients w.r.t. s and t."""
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    loss = textbook(s64, t64, T, labels, alpha, ignore_index)
    gs, gt = torch.autograd.grad(loss * grad_output, (s64, t64))
    return loss.detach(), gs, gt


def fused(s, t, T, labels=None, alpha=1.0, ignore_index=-100, grad_output=1.0, teacher_grad=False):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_(teacher_grad)
    loss = ops.kd_loss(s, t, temperature=T, labels=labels, alpha=alpha, ignore_index=ignore_index)
    inputs = (s, t) if teacher_grad else (s,)
    if not isinstance(grad_output, torch.Tensor):  # (a blocking host-to-device copy on CUDA)
        grad_output = torch.tensor(grad_output, dtype=loss.dtype, device=loss.device)
    grads = torch.autograd.grad(loss, inputs, grad_outputs=grad_output)
    return loss.detach(), grads


def logits(B, C, device, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    t = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def make_labels(B, C, device, seed=0, ignore_every=3, ignore_index=-100):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[::ignore_every] = ignore_index  # some ignored rows
    if B > 1:
        labels[1] = C - 1  # exercise the last class
    return labels.to(device)


def assert_close_fp32(actual, expected, T, B):
    # Loss: relative 1e-4, absolute scaled by T^2 (the loss' own scale).
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=2e-6 * max(1.0, T * T))


def assert_grad_close(actual, expected, rtol, frac):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=frac * scale + 1e-12)


# ---------------------------------------------------------------- value/grad matrix


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,C", list(itertools.product(BS, CS)))
def test_matrix_fp32_matches_reference(device, B, C):
    s, t = logits(B, C, device, seed=B * 7 + C)
    labels = make_labels(B, C, device, seed=C)
    for T in TS:
        # pure KD, grads of both inputs
        ref_loss, ref_gs, ref_gt = reference(s, t, T)
        loss, (gs, gt) = fused(s, t, T, teacher_grad=True)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert_close_fp32(loss, ref_loss, T, B)
        assert_grad_close(gs, ref_gs, 1e-3, 1e-4)
        assert_grad_close(gt, ref_gt, 1e-3, 1e-4)
        # with labels (some ignored), alpha mixing, grad_output != 1
        ref_loss, ref_gs, _ = reference(s, t, T, labels, alpha=0.3, grad_output=-2.5)
        loss, (gs,) = fused(s, t, T, labels, alpha=0.3, grad_output=-2.5)
        assert_close_fp32(loss, ref_loss, T, B)
        assert_grad_close(gs, ref_gs, 1e-3, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_textbook_formula_in_same_dtype(device, dtype):
    s, t = logits(16, 33, device, dtype)
    labels = make_labels(16, 33, device)
    for T, alpha in [(4.0, 1.0), (2.0, 0.5), (1.0, 0.0)]:
        lab = None if alpha == 1.0 else labels
        want = textbook(s, t, T, lab, alpha)
        got = ops.kd_loss(s, t, temperature=T, labels=lab, alpha=alpha)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,C", [(3, 7), (64, 100), (8, 1025), (4, 4097), (1, 1)])
def test_half_precision_against_fp32_reference(device, dtype, B, C):
    s, t = logits(B, C, device, dtype)
    labels = make_labels(B, C, device)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for T in (1.0, 4.0):
        # Reference from the same (rounded) inputs, in float64.
        ref_loss, ref_gs, ref_gt = reference(s, t, T, labels, alpha=0.7)
        loss, (gs, gt) = fused(s, t, T, labels, alpha=0.7, teacher_grad=True)
        # an fp32 loss (as eager autocast gives), gradients in the logits' dtype
        assert loss.dtype == torch.float32 and gs.dtype == dtype and gt.dtype == dtype
        torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
        assert_grad_close(gs, ref_gs, tol, tol)
        assert_grad_close(gt, ref_gt, tol, tol)


# ---------------------------------------------------------------- special inputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_identical_logits_give_zero(device, dtype):
    for B, C in [(1, 1), (3, 7), (256, 1025)]:
        s, _ = logits(B, C, device, dtype)
        for T in TS:
            loss, (gs, gt) = fused(s, s, T, teacher_grad=True)
            assert loss.item() == 0.0
            assert gs.abs().max().item() <= 1e-7
            assert gt.abs().max().item() <= 1e-7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_huge_logits_stay_finite(device, dtype):
    for B, C in [(4, 7), (8, 1000), (2, 4097)]:
        s, t = logits(B, C, device, torch.float32, scale=1.0)
        s = (s.sign() * 1e4).to(dtype)  # +-1e4
        t = (t.sign() * 1e4).to(dtype)
        labels = make_labels(B, C, device)
        for T in (0.5, 4.0):
            loss, (gs, gt) = fused(s, t, T, labels, alpha=0.5, teacher_grad=True)
            assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
            ref_loss, ref_gs, _ = reference(s, t, T, labels, alpha=0.5)
            rtol = 1e-3 if dtype == torch.float32 else 1e-2  # the loss is rounded to dtype
            torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=1e-3)
            assert_grad_close(gs, ref_gs, 1e-2, 1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_teacher_masked_class_counts_as_zero(device, dtype):
    """A teacher logit of -inf (a masked class, p = 0) adds nothing, as in
    F.kl_div, instead of 0 * -inf = nan; the gradients stay finite."""
    for B, C in [(3, 7), (4, 1025)]:
        s, t = logits(B, C, device, dtype)
        t = t.clone()
        t[:, 1] = float("-inf")
        t[0, C - 1] = float("-inf")
        for T in (1.0, 4.0):
            loss, (gs, gt) = fused(s, t, T, teacher_grad=True)
            s_ref = s.detach().clone().requires_grad_()
            want = ops.kd_loss_eager(s_ref, t, temperature=T)
            (want_gs,) = torch.autograd.grad(want, s_ref)
            torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gs, want_gs, rtol=1e-4, atol=1e-7)
            assert torch.isfinite(gt).all()
            # 0, or 2^-100-sized where float32 clamps the exponent
            assert gt[:, 1].abs().max() <= 1e-20 and gt[0, C - 1].abs() <= 1e-20


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    B, C = 6, 101
    base_s, base_t = logits(B, 2 * C + 3, device)
    labels = make_labels(B, C, device)
    views = {
        "row-strided": (base_s[:, 1 : C + 1], base_t[:, :C]),  # unit column stride, row stride 2C+3
        "column-strided": (base_s[:, : 2 * C : 2], base_t[:, 1 : 2 * C + 1 : 2]),
        "transposed": (base_s[:, :C].t().contiguous().t(), base_t[:, :C].t().contiguous().t()),
    }
    for name, (s, t) in views.items():
        assert not s.is_contiguous(), name
        ref_loss, ref_gs, ref_gt = reference(s, t, 2.0, labels, alpha=0.6)
        loss, (gs, gt) = fused(s, t, 2.0, labels, alpha=0.6, teacher_grad=True)
        assert_close_fp32(loss, ref_loss, 2.0, B)
        assert_grad_close(gs, ref_gs, 1e-3, 1e-4)
        assert_grad_close(gt, ref_gt, 1e-3, 1e-4)
        assert gs.shape == s.shape and gt.shape == t.shape


@pytest.mark.parametrize("device", DEVICES)
def test_all_labels_ignored_contributes_zero(device):
    s, t = logits(5, 9, device)
    labels = torch.full((5,), -1, dtype=torch.long, device=device)
    alpha = 0.25
    loss, (gs,) = fused(s, t, 3.0, labels, alpha=alpha, ignore_index=-1)
    pure, (gs_pure,) = fused(s, t, 3.0)
    torch.testing.assert_close(loss, alpha * pure)
    torch.testing.assert_close(gs, alpha * gs_pure)
    eager = ops.kd_loss_eager(s, t, temperature=3.0, labels=labels, alpha=alpha, ignore_index=-1)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_alpha_zero_is_cross_entropy(device):
    s, t = logits(7, 11, device)
    labels = make_labels(7, 11, device, ignore_every=100)
    loss = ops.kd_loss(s, t, temperature=4.0, labels=labels, alpha=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(s, labels), rtol=1e-5, atol=1e-6)


def test_eager_reference_matches_formula():
    s, t = logits(9, 13, "cpu", torch.float64)
    labels = make_labels(9, 13, "cpu")
    torch.testing.assert_close(
        ops.kd_loss_eager(s, t, temperature=3.0, labels=labels, alpha=0.4), textbook(s, t, 3.0, labels, 0.4)
    )
    torch.testing.assert_close(ops.kd_loss_eager(s, t, temperature=3.0), textbook(s, t, 3.0))


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    for B, C, T in [(3, 5, 2.0), (2, 17, 0.5), (1, 1, 4.0)]:
        s, t = logits(B, C, device, torch.float64, scale=1.0)
        s.requires_grad_()
        t.requires_grad_()
        labels = make_labels(B, C, device, ignore_every=2)
        torch.autograd.gradcheck(lambda a, b: ops.kd_loss(a, b, temperature=T), (s, t))
        torch.autograd.gradcheck(
            lambda a, b: ops.kd_loss(a, b, temperature=T, labels=labels, alpha=0.3), (s, t)
        )
        torch.autograd.gradcheck(lambda a: ops.kd_loss(a, t.detach(), temperature=T), (s,))


@pytest.mark.parametrize("device", DEVICES)
def test_grads_only_for_inputs_that_require_them(device):
    s, t = logits(4, 10, device)
    s.requires_grad_()
    loss = ops.kd_loss(s, t)
    loss.backward()
    assert s.grad is not None and t.grad is None
    with torch.no_grad():
        assert ops.kd_loss(s, t).grad_fn is None


@pytest.mark.parametrize("device", DEVICES)
def test_direct_op_call_without_grad_flags_recomputes(device):
    s, t = logits(4, 10, device)
    s.requires_grad_()
    t.requires_grad_()
    loss, _, _ = torch.ops.pyramidkd.kd_loss_fwd(s, t, None, 2.0, 1.0, -100, False, False)
    gs, gt = torch.autograd.grad(loss * 3, (s, t))
    _, ref_gs, ref_gt = reference(s, t, 2.0, grad_output=3.0)
    assert_grad_close(gs, ref_gs, 1e-4, 1e-5)
    assert_grad_close(gt, ref_gt, 1e-4, 1e-5)


def test_fast_path_runs_no_python_autograd():
    """ops.kd_loss goes through the C++ autograd node of pyramidkd::kd_loss; the
    Python kernel of kd_loss_fwd (for direct callers) must not run there, or
    every call would pay its ~80 µs."""
    s, t = logits(8, 10, "cpu")
    s.requires_grad_()
    watched = {ops._kd_loss_fwd_autograd.__code__, ops._kd_loss_backward.__code__}
    seen = []

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            seen.append(frame.f_code.co_name)

    sys.setprofile(profiler)
    try:
        torch.autograd.grad(ops.kd_loss(s, t, temperature=2.0), s)
        torch.ops.pyramidkd.kd_loss_fwd(s, t, None, 2.0, 1.0, -100, True, False)
    finally:
        sys.setprofile(None)
    assert seen == ["_kd_loss_fwd_autograd"]  # only the direct call of the primitive


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_raises(device):
    s, t = logits(3, 5, device)
    s.requires_grad_()
    loss = ops.kd_loss(s, t)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_retain_graph_backward_twice(device):
    # The backward scales the saved gradient in place only when the graph is
    # freed afterwards; with retain_graph=True it must stay intact.
    s, t = logits(4, 9, device)
    s.requires_grad_()
    t.requires_grad_()
    loss = ops.kd_loss(s, t, temperature=2.0)
    first = torch.autograd.grad(loss * 3, (s, t), retain_graph=True)
    second = torch.autograd.grad(loss * 3, (s, t), retain_graph=True)
    third = torch.autograd.grad(loss * 3, (s, t))
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(loss, s)  # graph freed


@pytest.mark.parametrize("device", DEVICES)
def test_backward_accumulates_and_scales(device):
    s, t = logits(5, 8, device)
    s.requires_grad_()
    (ops.kd_loss(s, t) * 2 + ops.kd_loss(s, t) * 0.5).backward()
    _, ref_gs, _ = reference(s, t, 4.0, grad_output=2.5)
    assert_grad_close(s.grad, ref_gs, 1e-4, 1e-5)


# ---------------------------------------------------------------- determinism


def test_deterministic_across_runs_and_threads():
    s, t = logits(300, 1000, "cpu")
    labels = make_labels(300, 1000, "cpu")
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, old), 1):
            torch.set_num_threads(threads)
            loss, (gs, gt) = fused(s, t, 3.0, labels, alpha=0.5, teacher_grad=True)
            results.append((loss, gs, gt))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
@pytest.mark.cuda
def test_cuda_deterministic_and_no_sync():
    # Every input is built first: torch.tensor(..., device="cuda") is a
    # blocking copy that the sync debug mode would (rightly) flag.
    s, t = logits(512, 5000, "cuda")
    labels = make_labels(512, 5000, "cuda")
    grad_output = torch.full((), -2.0, device="cuda")  # the backward reads it on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runs = [fused(s, t, 2.0, labels, alpha=0.5, grad_output=grad_output, teacher_grad=True) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for loss, grads in runs[1:]:
        assert torch.equal(loss, runs[0][0])
        for a, b in zip(grads, runs[0][1]):
            assert torch.equal(a, b)


_VARIANT_CODE = """
import sys, torch
from pyramidkd.engine import ops
g = torch.Generator().manual_seed(0)
s = torch.randn(7, 1031, generator=g) * 3
t = torch.randn(7, 1031, generator=g) * 3
lab = torch.randint(0, 1031, (7,), generator=g)
outs = []
for dt in (torch.float32, torch.bfloat16):
    a = s.to(dt).detach().requires_grad_()
    b = t.to(dt).detach().requires_grad_()
    loss = ops.kd_loss(a, b, temperature=2.0, labels=lab, alpha=0.5)
    loss.backward()
    outs.append((loss.detach().float(), a.grad.float(), b.grad.float()))
if __name__ == "__main__":  # run by `python -c` in a subprocess, not exec'd in the test
    torch.save((ops.cpu_kernel_name(), outs), sys.argv[1])
"""


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def test_cpu_kernel_variants_agree(tmp_path):
    """Every build of the row kernel this CPU can run (baseline, AVX2, AVX512)
    agrees with the one this process uses."""
    here = {"__name__": "variant"}
    exec(compile(_VARIANT_CODE, "variant", "exec"), here)  # noqa: S102 - fixed test code
    base_name, base = ops.cpu_kernel_name(), here["outs"]
    flags = _cpu_flags()
    others = ["default"]
    others += ["avx2"] if {"avx2", "fma", "f16c"} <= flags else []
    others += ["avx512"] if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags else []
    for cap in others:
        if cap == base_name:
            continue
        path = tmp_path / f"{cap}.pt"
        env = dict(os.environ, PYRAMIDKD_CPU_CAPABILITY=cap)
        subprocess.run([sys.executable, "-c", _VARIANT_CODE, str(path)], check=True, env=env, timeout=120)
        name, outs = torch.load(path)
        assert name == cap
        for (la, ga, ta), (lb, gb, tb) in zip(outs, base):
            torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-6, msg=name)
            torch.testing.assert_close(ta, tb, rtol=1e-3, atol=1e-6, msg=name)


# ---------------------------------------------------------------- argument checks


def test_argument_errors():
    s, t = logits(4, 6, "cpu")
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        ops.kd_loss(s, t[:, :5])
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        ops.kd_loss(s[0], t[0])
    with pytest.raises(ValueError, match="temperature"):
        ops.kd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        ops.kd_loss(s, t, temperature=float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        ops.kd_loss(s, t, labels=labels, alpha=1.5)
    with pytest.raises(ValueError, match="needs labels"):
        ops.kd_loss(s, t, alpha=0.5)
    with pytest.raises(TypeError, match="int64"):
        ops.kd_loss(s, t, labels=labels.int(), alpha=0.5)
    with pytest.raises(ValueError, match=r"labels must have shape"):
        ops.kd_loss(s, t, labels=labels[:3], alpha=0.5)
    with pytest.raises(TypeError, match="dtype"):
        ops.kd_loss(s, t.double())
    with pytest.raises(TypeError, match="dtype"):
        ops.kd_loss(s.int(), t.int())
    with pytest.raises(ValueError, match="B >= 1"):
        ops.kd_loss(s[:0], t[:0])
    with pytest.raises(RuntimeError, match="out of range"):
        ops.kd_loss(s, t, labels=torch.tensor([0, 1, 6, 2]), alpha=0.5)
    # direct calls of the raw op run the same checker (RuntimeError, like a torch op's checks)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.pyramidkd.kd_loss_fwd(s, t, None, -1.0, 1.0, -100, False, False)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.pyramidkd.kd_loss_fwd(s, t[:3], None, 1.0, 1.0, -100, False, False)
    # the eager reference applies the same checks
    with pytest.raises(ValueError, match="temperature"):
        ops.kd_loss_eager(s, t, temperature=-2.0)


BAD_ARGUMENTS = {
    "shape": dict(t=lambda t: t[:, :5]),
    "dtype": dict(t=lambda t: t.double()),
    "temperature": dict(temperature=0.0),
    "alpha": dict(labels=True, alpha=1.5),
    "alpha without labels": dict(alpha=0.5),
    "labels dtype": dict(labels=True, alpha=0.5, labels_dtype=torch.int32),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_one_checker_gives_one_message_everywhere(case):
    """The front end, a direct call of the raw op and the fake kernels all
    report a bad argument with the text of check_kd_loss_args."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = BAD_ARGUMENTS[case]
    s, t = logits(4, 6, "cpu")
    t = spec.get("t", lambda t: t)(t)
    labels = torch.zeros(4, dtype=spec.get("labels_dtype", torch.long)) if spec.get("labels") else None
    T, alpha = spec.get("temperature", 2.0), spec.get("alpha", 1.0)
    with pytest.raises((TypeError, ValueError)) as front:
        ops.check_kd_loss_args(s, t, T, labels, alpha)
    message = str(front.value)
    assert message.startswith("kd_loss: ")
    for call in (
        lambda: ops.kd_loss(s, t, temperature=T, labels=labels, alpha=alpha),
        lambda: ops.kd_loss_eager(s, t, temperature=T, labels=labels, alpha=alpha),
    ):
        with pytest.raises(type(front.value)) as err:
            call()
        assert str(err.value) == message
    with pytest.raises(RuntimeError) as err:
        torch.ops.pyramidkd.kd_loss_fwd(s, t, labels, T, alpha, -100, False, False)
    assert str(err.value) == message
    with FakeTensorMode() as mode:
        fs, ft = mode.from_tensor(s), mode.from_tensor(t)
        fl = None if labels is None else mode.from_tensor(labels)
        for op, args in (
            (torch.ops.pyramidkd.kd_loss_fwd.default, (fs, ft, fl, T, alpha, -100, True, False)),
            (torch.ops.pyramidkd.kd_loss.default, (fs, ft, fl, T, alpha, -100)),
        ):
            with pytest.raises(RuntimeError) as err:
                op(*args)
            assert message in str(err.value), op


def test_kernels_keep_their_memory_safety_checks():
    """Below autograd (inference mode) no Python runs before the kernel: the
    C++ checks that keep it in bounds still refuse what would read past a buffer."""
    s, t = logits(4, 6, "cpu")
    fwd = torch.ops.pyramidkd.kd_loss_fwd
    with torch.inference_mode():
        for args in (
            (s, t[:3], None, 1.0, 1.0, -100, False, False),  # teacher rows past the end
            (s, t[:, :5], None, 1.0, 1.0, -100, True, False),
            (s[:0], t[:0], None, 1.0, 1.0, -100, False, False),  # B = 0
            (s.int(), t.int(), None, 1.0, 1.0, -100, False, False),  # not a float dtype
            (s, t.double(), None, 1.0, 1.0, -100, False, False),
            (s, t, torch.zeros(3, dtype=torch.long), 1.0, 0.5, -100, False, False),  # labels too short
            (s, t, torch.zeros(4, dtype=torch.int32), 1.0, 0.5, -100, False, False),
        ):
            with pytest.raises(RuntimeError, match="memory-safety check"):
                fwd(*args)
        with pytest.raises(RuntimeError, match="out of range"):  # label values: checked where read
            fwd(s, t, torch.tensor([0, 1, 6, 2]), 1.0, 0.5, -100, False, False)
        assert torch.isfinite(fwd(s, t, None, 2.0, 1.0, -100, False, False)[0])


def test_availability_api():
    assert ops.fused_available() is True
    assert ops.fused_unavailable_reason() is None
    assert ops.cpu_kernel_name() in {"default", "avx2", "avx512"}
    if "PYRAMIDKD_CPU_CAPABILITY" not in os.environ:
        # the kernel follows ATen's choice of instruction set
        aten = torch.backends.cpu.get_cpu_capability().lower()
        assert ops.cpu_kernel_name() == (aten if aten in {"avx2", "avx512"} else "default")
    if HAS_CUDA or os.environ.get("PYRAMIDKD_EXPECT_CUDA_BUILD") == "1":
        assert ops.fused_cuda_built(), "the extension was built without its CUDA kernel"


def test_extension_imports_from_elsewhere(tmp_path):
    """`import pyramidkd._C` works from an unrelated directory, even before torch."""
    subprocess.run(
        [sys.executable, "-c", "import pyramidkd._C, torch; assert hasattr(torch.ops.pyramidkd, 'kd_loss_fwd')"],
        check=True,
        cwd=tmp_path,
        timeout=120,
    )


# ---------------------------------------------------------------- torch.library / compile / export


def _opcheck_samples(device):
    samples = []
    for dtype in (torch.float32, torch.float64):
        s, t = logits(3, 9, device, dtype)
        labels = make_labels(3, 9, device, ignore_every=2)
        samples += [
            (s, t, None, 2.0, 1.0, -100, False, False),
            (s.clone().requires_grad_(), t, labels, 4.0, 0.3, -100, True, False),
            (s.clone().requires_grad_(), t.clone().requires_grad_(), labels, 1.0, 0.5, -100, True, True),
        ]
    s, t = logits(2, 1025, device, torch.bfloat16)
    samples.append((s.requires_grad_(), t, None, 3.0, 1.0, -100, True, False))
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.pyramidkd.kd_loss_fwd.default, args)
        # the differentiable entry point (C++ autograd) on the same inputs
        torch.library.opcheck(torch.ops.pyramidkd.kd_loss.default, args[:6])
        # its CUDA halves (internal, below autograd: inputs without grad)
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.pyramidkd.kd_loss_stats.default, plain[:6])
        loss, stats = torch.ops.pyramidkd.kd_loss_stats(*plain[:6])
        grad = torch.full_like(loss, -3.0)
        for flags in ((True, False), (True, True), (False, True)):
            bwd_args = (grad, *plain[:3], stats, *plain[3:6], *flags)
            torch.library.opcheck(torch.ops.pyramidkd.kd_loss_bwd.default, bwd_args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(s, t, labels):
        return ops.kd_loss(s, t, temperature=3.0, labels=labels, alpha=0.5) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    s, t = logits(6, 37, device)
    labels = make_labels(6, 37, device)
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    out_c = compiled(s1, t, labels)
    out_e = step(s2, t, labels)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_export(device):
    class Distill(torch.nn.Module):
        def forward(self, s, t, labels):
            return ops.kd_loss(s, t, temperature=2.0, labels=labels, alpha=0.75)

    s, t = logits(4, 12, device)
    labels = make_labels(4, 12, device)
    exported = torch.export.export(Distill(), (s, t, labels))
    assert any("pyramidkd.kd_loss" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(s, t, labels), Distill()(s, t, labels))
