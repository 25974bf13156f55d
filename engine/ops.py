"""Fused knowledge-distillation loss: Python front end of ``pyramidkd._C``.

``kd_loss`` computes, for student logits ``s`` and teacher logits ``t`` of
shape ``[B, C]`` with ``p = softmax(t / T)`` and ``q = softmax(s / T)``::

    KD   = T**2 / B * sum_b sum_c p (log p - log q)        # "batchmean" KL
    loss = KD                                              # labels is None
    loss = alpha * KD + (1 - alpha) * CE(s, labels)        # with labels

with fused C++ (CPU) or CUDA kernels: the custom operator
``torch.ops.pyramidkd.kd_loss_fwd`` returns the loss together with its
gradients w.r.t. the logits that require grad.  ``kd_loss`` calls
``torch.ops.pyramidkd.kd_loss``, whose autograd kernel (C++, for low per-call
overhead) wraps ``kd_loss_fwd`` on the CPU (the backward scales the saved
gradients) and, on CUDA, ``kd_loss_stats`` (loss + per-row statistics) and
``kd_loss_bwd`` (the gradients recomputed, scaled by ``grad_output`` inside
the kernel).  The loss is float32 (float64 for float64 logits).
Fake kernels for the ops and the Python autograd kernel of ``kd_loss_fwd``
(for direct calls of the primitive, torch.compile / torch.export / opcheck)
are registered below.  Teacher logits that require grad get correct
gradients too.  ``kd_loss_eager`` is the plain-PyTorch reference with the same
signature and semantics (used by the ``kd`` loss plugin for ``backend="eager"``
and as the ``auto`` fallback when the extension is not built).

The argument rules live in one place, ``check_kd_loss_args``: ``kd_loss``,
``kd_loss_eager``, the fake kernels and direct calls of ``kd_loss_fwd`` all
run it.  The C++ kernels check only what keeps them from reading or writing
out of bounds (see ``make_plan`` in csrc/kd_loss.cpp).

Cross-entropy conventions: the CE term is the mean over rows whose label is
not ``ignore_index``; when *every* label is ignored it contributes 0 (and no
gradient), where ``F.cross_entropy`` would return nan.

Double backward (``create_graph=True`` through the fused op, as used by
``torch.func.grad`` or gradient penalties) raises a ``RuntimeError``; use
``kd_loss_eager`` for that.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FusedOpUnavailable",
    "check_kd_loss_args",
    "cpu_kernel_name",
    "fused_available",
    "fused_cuda_built",
    "fused_unavailable_reason",
    "kd_loss",
    "kd_loss_eager",
]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class FusedOpUnavailable(RuntimeError):
    """The fused ``pyramidkd._C`` extension is not built or failed to load."""


def _load_extension() -> str | None:
    """Import ``pyramidkd._C`` (which registers the op); return why not, or None."""
    try:
        importlib.import_module("pyramidkd._C")
    except ImportError as exc:  # not built, or built against another torch
        return (
            f"the compiled extension pyramidkd._C could not be imported ({exc}); "
            "build it with `pip install --no-build-isolation .` (see docs/fused-loss.md)"
        )
    except OSError as exc:  # e.g. undefined symbols after a torch upgrade
        return f"the compiled extension pyramidkd._C failed to load ({exc}); rebuild it against this torch"
    for name in ("kd_loss_fwd", "kd_loss", "kd_loss_stats", "kd_loss_bwd"):
        if not hasattr(torch.ops.pyramidkd, name):
            return f"pyramidkd._C was imported but did not register torch.ops.pyramidkd.{name}"
    return None


_UNAVAILABLE_REASON = _load_extension()


def fused_available() -> bool:
    """True when the fused operator ``torch.ops.pyramidkd.kd_loss_fwd`` is registered."""
    return _UNAVAILABLE_REASON is None


def fused_unavailable_reason() -> str | None:
    """Why the fused operator is unavailable, or None when it is available."""
    return _UNAVAILABLE_REASON


def fused_cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernel (a GPU need not be present)."""
    if not fused_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("pyramidkd::kd_loss_fwd", "CUDA")


def cpu_kernel_name() -> str | None:
    """Instruction set of the CPU kernel in use ("avx512", "avx2" or "default")."""
    if not fused_available():
        return None
    return torch.ops.pyramidkd.cpu_kernel_name()


def _is_number(value: object) -> bool:
    # SymInt/SymFloat: the fake kernels see traced scalars under torch.compile.
    return not isinstance(value, bool) and isinstance(value, (int, float, torch.SymInt, torch.SymFloat))


def check_kd_loss_args(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    labels: Tensor | None,
    alpha: float,
) -> None:
    """Raise ``TypeError``/``ValueError`` unless the arguments of ``kd_loss`` are valid.

    The single statement of the op's rules, run by ``kd_loss``, ``kd_loss_eager``,
    the fake kernels and direct calls of ``torch.ops.pyramidkd.kd_loss_fwd``
    (label *values* are checked by the kernels, where they are read).
    """
    if not isinstance(student_logits, Tensor) or not isinstance(teacher_logits, Tensor):
        raise TypeError("kd_loss: student_logits and teacher_logits must be tensors")
    if student_logits.dim() != 2:
        raise ValueError(f"kd_loss: student logits must have shape [B, C], got {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"kd_loss: teacher logits must have the student's shape {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if student_logits.dtype not in _FLOAT_DTYPES or teacher_logits.dtype != student_logits.dtype:
        raise TypeError(
            "kd_loss: student and teacher logits must share one dtype among float32, float64, "
            f"float16, bfloat16; got {student_logits.dtype} and {teacher_logits.dtype}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"kd_loss: logits must be on one device, got {student_logits.device} and {teacher_logits.device}"
        )
    if student_logits.shape[0] < 1 or student_logits.shape[1] < 1:
        raise ValueError(f"kd_loss: need B >= 1 rows and C >= 1 classes, got {tuple(student_logits.shape)}")
    if not _is_number(temperature):
        raise TypeError(f"kd_loss: temperature must be a number, got {type(temperature).__name__}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"kd_loss: temperature must be a finite number > 0, got {temperature}")
    if not _is_number(alpha):
        raise TypeError(f"kd_loss: alpha must be a number, got {type(alpha).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"kd_loss: alpha must be in [0, 1], got {alpha}")
    if labels is None:
        if alpha != 1.0:
            raise ValueError(
                f"kd_loss: alpha={alpha} < 1 weights a cross-entropy term, which needs labels (got labels=None)"
            )
        return
    if not isinstance(labels, Tensor):
        raise TypeError("kd_loss: labels must be a tensor or None")
    if labels.dim() != 1 or labels.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"kd_loss: labels must have shape [B] = [{student_logits.shape[0]}], got {tuple(labels.shape)}"
        )
    if labels.dtype != torch.int64:
        raise TypeError(f"kd_loss: labels must be int64 (torch.long), got {labels.dtype}")
    if labels.device != student_logits.device:
        raise ValueError(f"kd_loss: labels must be on {student_logits.device}, got {labels.device}")


def _check_op_args(student: Tensor, teacher: Tensor, labels: Tensor | None, temperature: float, alpha: float) -> None:
    """``check_kd_loss_args`` for the raw ops (schema argument order), raising
    ``RuntimeError`` as a torch operator's own checks do."""
    try:
        check_kd_loss_args(student, teacher, temperature, labels, alpha)
    except (TypeError, ValueError) as exc:
        raise RuntimeError(str(exc)) from exc


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 4.0,
    labels: Tensor | None = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Fused KD loss (see the module docstring); returns a 0-dim float32 tensor
    (float64 for float64 logits; fp16/bf16 logits give an fp32 loss, as under autocast).

    Raises ``FusedOpUnavailable`` when the extension is not built.
    """
    if _UNAVAILABLE_REASON is not None:
        raise FusedOpUnavailable(f"kd_loss: the fused op is unavailable: {_UNAVAILABLE_REASON}")
    check_kd_loss_args(student_logits, teacher_logits, temperature, labels, alpha)
    # pyramidkd::kd_loss has a C++ autograd kernel that calls kd_loss_fwd
    # with the gradient flags of the inputs (see csrc/kd_loss_autograd.cpp).
    return _KD_LOSS_OP(student_logits, teacher_logits, labels, float(temperature), float(alpha), int(ignore_index))


def kd_loss_eager(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 4.0,
    labels: Tensor | None = None,
    alpha: float = 1.0,
    ignore_index: int = -100,
) -> Tensor:
    """Plain-PyTorch reference of ``kd_loss`` (same arguments, same result)."""
    check_kd_loss_args(student_logits, teacher_logits, temperature, labels, alpha)
    T = float(temperature)
    kd = (
        F.kl_div(
            F.log_softmax(student_logits / T, dim=1),
            F.softmax(teacher_logits / T, dim=1),
            reduction="batchmean",
        )
        * T
        * T
    )
    if labels is None or alpha == 1.0:
        return kd
    # Mean over the non-ignored rows; 0 (not nan) when every label is ignored.
    ce_sum = F.cross_entropy(student_logits, labels, ignore_index=ignore_index, reduction="sum")
    n_valid = (labels != ignore_index).sum().clamp_min(1).to(ce_sum.dtype)
    return alpha * kd + (1.0 - alpha) * (ce_sum / n_valid)


_STATS_COLS = 8  # kStatsCols in csrc/kd_loss.h


def _loss_dtype(logits: Tensor) -> torch.dtype:
    """The op's loss dtype: float64 for float64 logits, else float32 (as eager autocast)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _scaled(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """grad * grad_loss in the loss' precision, then rounded to grad's dtype: a
    device tensor would be cast to fp16 first, where GradScaler's 65536 is inf."""
    if grad.dtype == grad_loss.dtype:
        return grad_loss * grad
    return (grad.to(grad_loss.dtype) * grad_loss).to(grad.dtype)


# --------------------------------------------------------------------------
# torch.library registrations, only when the extension defined the ops: fake
# kernels (torch.compile / export) and the autograd kernel of kd_loss_fwd.

_KD_LOSS_OP = None

if _UNAVAILABLE_REASON is None:
    _KD_LOSS_OP = torch.ops.pyramidkd.kd_loss.default  # resolved once: saves per-call overload lookup

    @torch.library.register_fake("pyramidkd::kd_loss_fwd")
    def _kd_loss_fwd_fake(student, teacher, labels, temperature, alpha, ignore_index, grad_student, grad_teacher):
        _check_op_args(student, teacher, labels, temperature, alpha)
        loss = student.new_empty((), dtype=_loss_dtype(student))
        gs = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
        gt = student.new_empty(student.shape) if grad_teacher else student.new_empty((0,))
        return loss, gs, gt

    @torch.library.register_fake("pyramidkd::kd_loss")
    def _kd_loss_fake(student, teacher, labels, temperature, alpha, ignore_index):
        _check_op_args(student, teacher, labels, temperature, alpha)
        return student.new_empty((), dtype=_loss_dtype(student))

    # The CUDA training path of kd_loss (csrc/kd_loss_autograd.cpp): loss and
    # [B, 8] row statistics, then the gradient kernel scaled by grad_loss.
    @torch.library.register_fake("pyramidkd::kd_loss_stats")
    def _kd_loss_stats_fake(student, teacher, labels, temperature, alpha, ignore_index):
        _check_op_args(student, teacher, labels, temperature, alpha)
        dtype = _loss_dtype(student)
        return student.new_empty((), dtype=dtype), student.new_empty((student.shape[0], _STATS_COLS), dtype=dtype)

    @torch.library.register_fake("pyramidkd::kd_loss_bwd")
    def _kd_loss_bwd_fake(
        grad_loss, student, teacher, labels, row_stats, temperature, alpha, ignore_index, grad_student, grad_teacher
    ):
        _check_op_args(student, teacher, labels, temperature, alpha)
        gs = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
        gt = student.new_empty(student.shape) if grad_teacher else student.new_empty((0,))
        return gs, gt

    # Autograd of the primitive kd_loss_fwd.  The kd_loss op has the same
    # formula as a C++ node (csrc/kd_loss_autograd.cpp): that is the fast
    # eager path of ops.kd_loss, which calls kd_loss_fwd below autograd, so
    # nothing here runs there.  This Python kernel serves direct calls of
    # kd_loss_fwd (opcheck, tracing, users of the raw op).
    def _kd_loss_setup_context(ctx, inputs, output):
        student, teacher, labels, temperature, alpha, ignore_index, grad_student, grad_teacher = inputs
        _, gs, gt = output
        ctx.mark_non_differentiable(gs, gt)
        # Gradients were computed in the forward for the flags that were set.
        # If autograd needs one that was not (the op was called directly with
        # a False flag), keep the inputs to recompute it in the backward.
        recompute = (ctx.needs_input_grad[0] and not grad_student) or (ctx.needs_input_grad[1] and not grad_teacher)
        ctx.recompute = recompute
        ctx.args = (temperature, alpha, ignore_index)
        if recompute:
            ctx.save_for_backward(student, teacher, labels)
        else:
            ctx.save_for_backward(gs if grad_student else None, gt if grad_teacher else None)

    def _kd_loss_backward(ctx, grad_loss, _grad_gs, _grad_gt):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "pyramidkd kd_loss: double backward (create_graph=True, torch.func.grad, ...) is not "
                "supported by the fused op; use pyramidkd.engine.ops.kd_loss_eager (kd backend='eager')"
            )
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.recompute:
            student, teacher, labels = ctx.saved_tensors
            temperature, alpha, ignore_index = ctx.args
            _, gs, gt = torch.ops.pyramidkd.kd_loss_fwd(
                student, teacher, labels, temperature, alpha, ignore_index, need_s, need_t
            )
        else:
            gs, gt = ctx.saved_tensors
        grad_s = _scaled(gs, grad_loss) if need_s else None
        grad_t = _scaled(gt, grad_loss) if need_t else None
        return grad_s, grad_t, None, None, None, None, None, None

    # What torch.library.register_autograd builds (torch's private helper),
    # wrapped so that a direct call is checked by check_kd_loss_args first:
    # register_autograd offers no place for that, and the C++ kernels keep
    # only their memory-safety checks.
    try:
        from torch._library.autograd import Info as _AutogradInfo
        from torch._library.autograd import make_autograd_impl as _make_autograd_impl
    except ImportError:  # a torch that moved it: same formula, direct calls unchecked
        torch.library.register_autograd(
            "pyramidkd::kd_loss_fwd", _kd_loss_backward, setup_context=_kd_loss_setup_context
        )
    else:
        _kd_loss_fwd_autograd_impl = _make_autograd_impl(
            torch.ops.pyramidkd.kd_loss_fwd.default,
            _AutogradInfo(_backward_fn=_kd_loss_backward, _setup_context_fn=_kd_loss_setup_context),
        )

        def _kd_loss_fwd_autograd(keyset, student, teacher, labels, temperature, alpha, *rest):
            _check_op_args(student, teacher, labels, temperature, alpha)
            return _kd_loss_fwd_autograd_impl(keyset, student, teacher, labels, temperature, alpha, *rest)

        _LIBRARY = torch.library.Library("pyramidkd", "FRAGMENT")  # kept alive: it owns the registration
        _LIBRARY.impl("kd_loss_fwd", _kd_loss_fwd_autograd, "Autograd", with_keyset=True)
