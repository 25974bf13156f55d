// pyramidkd::kd_loss_fwd — schema, memory-safety checks and the module stub.
//
// Layout follows pytorch/extension-cpp: the operator schema lives here in one
// TORCH_LIBRARY block, the CPU kernel in csrc/cpu/ and the CUDA kernel in
// csrc/cuda/ register themselves with TORCH_LIBRARY_IMPL.  The extension is
// built against Python's limited API (no pybind11): importing pyramidkd._C
// only runs the static registrations below.  Fake (meta) kernels, the
// autograd kernel of kd_loss_fwd and the argument rules
// (check_kd_loss_args) are in Python (pyramidkd/engine/ops.py).

#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "kd_loss.h"

extern "C" {
// Creates an empty module so that `import pyramidkd._C` loads this shared
// object (and with it the operator registrations).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "pyramidkd fused kernels (operators live in torch.ops.pyramidkd)",
      -1,  // no per-interpreter state
      nullptr,  // no methods
  };
  return PyModule_Create(&module_def);
}
}

namespace pyramidkd {

// Only the checks that keep the kernels inside their buffers.  The argument
// rules (and their messages) are stated once, in Python:
// pyramidkd.engine.ops.check_kd_loss_args runs before every call that comes
// through Python; these catch a call that bypasses it (C++, inference mode).
#define PYRAMIDKD_SAFETY_CHECK(cond)                                              \
  TORCH_CHECK(                                                                    \
      cond,                                                                       \
      "kd_loss_fwd: arguments fail the memory-safety check `" #cond "`; the "   \
      "rules are in pyramidkd.engine.ops.check_kd_loss_args")

KdLossPlan make_plan(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index,
    bool grad_student,
    bool grad_teacher) {
  const auto dt = student.scalar_type();
  // Rows and columns are indexed from the student's sizes, data pointers are
  // read as the student's dtype on the student's device.
  PYRAMIDKD_SAFETY_CHECK(student.dim() == 2 && student.size(0) >= 1 && student.size(1) >= 1);
  PYRAMIDKD_SAFETY_CHECK(teacher.sizes() == student.sizes());
  PYRAMIDKD_SAFETY_CHECK(
      dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16);
  PYRAMIDKD_SAFETY_CHECK(teacher.scalar_type() == dt);
  PYRAMIDKD_SAFETY_CHECK(teacher.device() == student.device());

  KdLossPlan plan;
  plan.B = student.size(0);
  plan.C = student.size(1);
  plan.temperature = temperature;
  plan.ignore_index = ignore_index;
  plan.grad_student = grad_student;
  plan.grad_teacher = grad_teacher;
  if (labels.has_value() && labels->defined()) {
    const auto& l = *labels;
    // Label values are checked where they are read (CPU: TORCH_CHECK; CUDA:
    // the row's loss and gradient become NaN -- a device assert would be
    // sticky and kill the context), since checking them here would sync
    // with the GPU.  The data loaders validate labels once, up front.
    PYRAMIDKD_SAFETY_CHECK(l.dim() == 1 && l.size(0) == plan.B);
    PYRAMIDKD_SAFETY_CHECK(l.scalar_type() == at::kLong);
    PYRAMIDKD_SAFETY_CHECK(l.device() == student.device());
    plan.kd_weight = alpha;
    plan.ce_weight = 1.0 - alpha;
    plan.use_ce = plan.ce_weight > 0.0;
  } else {
    plan.kd_weight = 1.0;  // without labels alpha is 1 (checked in Python)
    plan.ce_weight = 0.0;
    plan.use_ce = false;
  }
  return plan;
}

at::ScalarType stats_dtype(at::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}

void check_bwd_buffers(
    const at::Tensor& grad_loss, const at::Tensor& row_stats, const KdLossPlan& plan, const at::Tensor& like) {
  PYRAMIDKD_SAFETY_CHECK(grad_loss.numel() == 1 && grad_loss.device() == like.device());
  PYRAMIDKD_SAFETY_CHECK(row_stats.dim() == 2 && row_stats.size(0) == plan.B && row_stats.size(1) == kStatsCols);
  PYRAMIDKD_SAFETY_CHECK(row_stats.is_contiguous() && row_stats.device() == like.device());
  PYRAMIDKD_SAFETY_CHECK(row_stats.scalar_type() == stats_dtype(like.scalar_type()));
}

#undef PYRAMIDKD_SAFETY_CHECK

at::Tensor empty_grad(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

TORCH_LIBRARY(pyramidkd, m) {
  // Returns (loss, grad_student, grad_teacher).  The loss is a 0-dim float32
  // tensor (float64 for float64 logits): fp16/bf16 logits are accumulated and
  // reduced in fp32, and an fp32 loss is what eager autocast returns and what
  // GradScaler needs (its 65536 overflows fp16).  The gradients of the loss
  // w.r.t. the logits (grad_output = 1) are returned when requested, as
  // contiguous [B, C] tensors of the logits' dtype; otherwise they are empty
  // ([0]) placeholders.  The Python autograd kernel of this op scales them.
  m.def(
      "kd_loss_fwd(Tensor student, Tensor teacher, Tensor? labels, "
      "float temperature, float alpha, int ignore_index, "
      "bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)");
  // The differentiable entry point (autograd kernel in kd_loss_autograd.cpp).
  m.def(
      "kd_loss(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
      "float alpha, int ignore_index) -> Tensor");
  // kd_loss on CUDA, split at the autograd boundary: the forward returns the
  // loss and [B, 8] row statistics (reads s and t once); the backward
  // recomputes the gradients from s, t and the statistics and multiplies by
  // grad_loss inside the kernel, reading it on the device.  The CPU kernels
  // exist for opcheck and device-generic callers: stats are zeros there and
  // the backward recomputes everything.
  m.def(
      "kd_loss_stats(Tensor student, Tensor teacher, Tensor? labels, "
      "float temperature, float alpha, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "kd_loss_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? labels, "
      "Tensor row_stats, float temperature, float alpha, int ignore_index, "
      "bool grad_student, bool grad_teacher) -> (Tensor, Tensor)");
}

}  // namespace pyramidkd
