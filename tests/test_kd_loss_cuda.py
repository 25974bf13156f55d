"""The fused loss' CUDA path and its precision contract.

Runs everywhere: the structure of the CUDA training path traced with fake CUDA
tensors (forward = kd_loss_stats, backward = one kd_loss_bwd that reads
grad_output on the device, no separate scaling pass), the fp32 loss for
fp16/bf16 logits under CPU autocast and GradScaler.  Runs where a GPU is
visible (skipped cleanly otherwise): the CUDA op against the CPU op on the same
inputs (C up to 32000, masked classes, labels), a second GPU, CUDA autocast
with GradScaler, an out-of-range label.  The kernel's row logic itself is
tested without a GPU in tests/test_kernel_harness.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from pyramidkd.engine import ops

if not ops.fused_available():
    if os.environ.get("PYRAMIDKD_REQUIRE_FUSED") == "1":
        raise RuntimeError(f"fused kd_loss required but unavailable: {ops.fused_unavailable_reason()}")
    pytest.skip(f"fused kd_loss unavailable: {ops.fused_unavailable_reason()}", allow_module_level=True)

HAS_CUDA = torch.cuda.is_available()


def logits(B, C, device="cpu", dtype=torch.float32, seed=0, masked=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g) * 3
    t = torch.randn(B, C, generator=g) * 3
    if masked and C > 2:
        t[torch.rand(B, C, generator=g) < 0.3] = float("-inf")
        t[:, C // 3 : C // 3 + min(C // 2, 400)] = float("-inf")
        t[:, 0] = t[:, 0].clamp_min(-1.0)
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def make_labels(B, C, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[::3] = -100
    return labels.to(device)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not name.startswith("prim."):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_cuda_training_path_fuses_the_grad_output_scale():
    """On CUDA the forward computes the loss and row statistics only, and the
    backward is one kd_loss_bwd that takes grad_output as a device tensor:
    no saved [B, C] gradient and no extra multiply pass (the old path ran
    kd_loss_fwd with gradients, then an aten.mul over B x C)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        s = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16).requires_grad_()
        t = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16).requires_grad_()
        labels = torch.zeros(64, dtype=torch.long, device="cuda")
        forward = _Recorder()
        with forward:
            loss = ops.kd_loss(s, t, temperature=2.0, labels=labels, alpha=0.5)
        assert forward.ops == ["pyramidkd.kd_loss_stats"]
        assert loss.dtype == torch.float32 and loss.device.type == "cuda"
        grad_output = torch.full((), 65536.0, device="cuda")  # GradScaler's scale, never read on the host
        backward = _Recorder()
        with backward, torch.no_grad():
            gs, gt = loss.grad_fn(grad_output)  # the node itself: the engine needs a real GPU
        assert backward.ops == ["pyramidkd.kd_loss_bwd"]
        assert gs.shape == s.shape and gs.dtype == torch.bfloat16 and gt.shape == t.shape


def test_cpu_training_path_keeps_the_one_pass_kernel():
    s, t = logits(8, 10)
    s.requires_grad_()
    forward = _Recorder()
    with forward:
        loss = ops.kd_loss(s, t)
    assert forward.ops == ["pyramidkd.kd_loss_fwd"]
    torch.autograd.grad(loss, s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_autocast_gives_an_fp32_loss_like_eager(dtype):
    lin = torch.nn.Linear(16, 10)
    x, t = torch.randn(8, 16), torch.randn(8, 10) * 3
    with torch.autocast("cpu", dtype=dtype):
        s = lin(x)
        assert s.dtype == dtype
        fused = ops.kd_loss(s, t.to(dtype), temperature=4.0)
        eager = ops.kd_loss_eager(s, t.to(dtype), temperature=4.0)
    assert fused.dtype == eager.dtype == torch.float32
    # (eager divides by T in the 16-bit dtype first; the reference does not)
    want = ops.kd_loss_eager(s.detach().double(), t.to(dtype).double(), temperature=4.0)
    torch.testing.assert_close(fused.double(), want, rtol=1e-4, atol=1e-5)


def _first_steps_keep_the_scale(device, dtype, steps=3):
    """GradScaler starts at 65536, which overflows fp16: an fp16 loss made step
    0 non-finite, so the scaler skipped it and halved its scale."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 10).to(device)
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(device)
    x, t = torch.randn(8, 16, device=device), torch.randn(8, 10, device=device) * 3
    for _ in range(steps):
        with torch.autocast(device, dtype=dtype):
            s = lin(x)
            loss = ops.kd_loss(s, t.to(s.dtype), temperature=4.0)
        assert loss.dtype == torch.float32
        before = lin.weight.detach().clone()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert scaler.get_scale() == 65536.0, "a step was skipped as non-finite"
        assert not torch.equal(before, lin.weight.detach())


def test_gradscaler_fp16_first_step_is_not_skipped_cpu():
    _first_steps_keep_the_scale("cpu", torch.float16)


def test_kd_loss_bwd_cpu_scales_in_float():
    """The backward op multiplies by an fp32 grad_loss in float: 65536 times an
    fp16 gradient does not become inf on the way."""
    s, t = logits(4, 33, dtype=torch.float16)
    loss, stats = torch.ops.pyramidkd.kd_loss_stats(s, t, None, 2.0, 1.0, -100)
    assert loss.dtype == stats.dtype == torch.float32 and stats.shape == (4, 8)
    gs, gt = torch.ops.pyramidkd.kd_loss_bwd(torch.tensor(65536.0), s, t, None, stats, 2.0, 1.0, -100, True, True)
    _, ref_gs, ref_gt = torch.ops.pyramidkd.kd_loss_fwd(s.float(), t.float(), None, 2.0, 1.0, -100, True, True)
    torch.testing.assert_close(gs.float(), ref_gs * 65536, rtol=3e-3, atol=1e-2)
    torch.testing.assert_close(gt.float(), ref_gt * 65536, rtol=3e-3, atol=1e-2)


# ---------------------------------------------------------------- on a GPU


def _both(s, t, T, labels=None, alpha=1.0, grad_output=1.0, device="cuda"):
    """Loss and gradients of the training path (kd_loss + autograd) on `device`
    and on the CPU, from the same inputs."""
    out = []
    for dev in (device, "cpu"):
        a = s.detach().to(dev).requires_grad_()
        b = t.detach().to(dev).requires_grad_()
        lab = None if labels is None else labels.to(dev)
        loss = ops.kd_loss(a, b, temperature=T, labels=lab, alpha=alpha)
        grads = torch.autograd.grad(loss, (a, b), grad_outputs=torch.full_like(loss, grad_output))
        out.append((loss.detach().cpu().double(), *(g.cpu().float() for g in grads)))
    return out


def _assert_same(cuda, cpu, dtype, T):
    rtol = {torch.float32: 1e-4, torch.bfloat16: 4e-3, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(cuda[0], cpu[0], rtol=rtol, atol=2e-6 * max(1.0, T * T))
    g_rtol = {torch.float32: 1e-3, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}[dtype]
    for a, b in zip(cuda[1:], cpu[1:]):
        torch.testing.assert_close(a, b, rtol=g_rtol, atol=3e-4 * b.abs().max().item() + 1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,C", [(1, 1), (3, 7), (64, 100), (8, 1024), (8, 1025), (4, 4097), (3, 5003), (16, 32000)])
@pytest.mark.parametrize("case", ["plain", "masked", "labels"])
def test_cuda_matches_cpu_kernel(B, C, dtype, case):
    s, t = logits(B, C, dtype=dtype, seed=B + C, masked=case == "masked")
    kw = dict(labels=make_labels(B, C, seed=C), alpha=0.3, grad_output=-2.5) if case == "labels" else {}
    for T in (1.0, 4.0, 20.0):
        cuda, cpu = _both(s, t, T, **kw)
        _assert_same(cuda, cpu, dtype, T)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["fwd", "stats", "bwd"])
def test_cuda_opcheck_of_each_op(dtype, op):
    s, t = logits(3, 1031, "cuda", dtype)
    labels = make_labels(3, 1031, "cuda")
    if op == "fwd":
        torch.library.opcheck(torch.ops.pyramidkd.kd_loss_fwd.default, (s, t, labels, 2.0, 0.5, -100, True, True))
    elif op == "stats":
        torch.library.opcheck(torch.ops.pyramidkd.kd_loss_stats.default, (s, t, labels, 2.0, 0.5, -100))
    else:
        loss, stats = torch.ops.pyramidkd.kd_loss_stats(s, t, labels, 2.0, 0.5, -100)
        args = (torch.full_like(loss, 3.0), s, t, labels, stats, 2.0, 0.5, -100, True, True)
        torch.library.opcheck(torch.ops.pyramidkd.kd_loss_bwd.default, args)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_second_device():
    """Tensors on cuda:1 while cuda:0 is current: every launch and allocation
    goes to the tensors' device (CUDAGuard), results match the CPU."""
    assert torch.cuda.current_device() == 0
    s, t = logits(32, 5003, seed=3)
    labels = make_labels(32, 5003)
    a = s.to("cuda:1").requires_grad_()
    loss = ops.kd_loss(a, t.to("cuda:1"), temperature=4.0, labels=labels.to("cuda:1"), alpha=0.5)
    (gs,) = torch.autograd.grad(loss, a)
    assert loss.device == gs.device == torch.device("cuda:1")
    cuda, cpu = _both(s, t, 4.0, labels=labels, alpha=0.5, device="cuda:1")
    _assert_same(cuda, cpu, torch.float32, 4.0)
    assert torch.cuda.current_device() == 0


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_loss_is_fp32_and_gradscaler_keeps_its_scale(dtype):
    lin = torch.nn.Linear(16, 10).cuda()
    x, t = torch.randn(8, 16, device="cuda"), torch.randn(8, 10, device="cuda") * 3
    with torch.autocast("cuda", dtype=dtype):
        s = lin(x)
        fused = ops.kd_loss(s, t.to(dtype), temperature=4.0)
        eager = ops.kd_loss_eager(s, t.to(dtype), temperature=4.0)
    assert s.dtype == dtype and fused.dtype == eager.dtype == torch.float32
    want = ops.kd_loss_eager(s.detach().double(), t.to(dtype).double(), temperature=4.0)
    torch.testing.assert_close(fused.double(), want, rtol=1e-4, atol=1e-5)
    if dtype == torch.float16:
        _first_steps_keep_the_scale("cuda", dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_cuda_out_of_range_label_gives_nan_and_the_context_survives():
    s, t = logits(4, 50, "cuda")
    labels = torch.tensor([0, 50, -100, 3], device="cuda")
    a = s.clone().requires_grad_()
    loss = ops.kd_loss(a, t, temperature=2.0, labels=labels, alpha=0.5)
    (gs,) = torch.autograd.grad(loss, a)
    torch.cuda.synchronize()  # a device assert would raise here, and on every later call
    assert torch.isnan(loss).item() and torch.isnan(gs[1]).all().item()
    assert torch.isfinite(gs[0]).all().item()
    assert (torch.ones(3, device="cuda") * 2).sum().item() == 6.0
