// pyramidkd::kd_loss_fwd — schema, shared argument checks and the module stub.
//
// Layout follows pytorch/extension-cpp: the operator schema lives here in one
// TORCH_LIBRARY block, the CPU kernel in csrc/cpu/ and the CUDA kernel in
// csrc/cuda/ register themselves with TORCH_LIBRARY_IMPL.  The extension is
// built against Python's limited API (no pybind11): importing pyramidkd._C
// only runs the static registrations below.  Fake (meta) kernels and the
// autograd formula are registered in Python (pyramidkd/engine/ops.py).

#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

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

KdLossPlan make_plan(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index,
    bool grad_student,
    bool grad_teacher) {
  TORCH_CHECK(
      student.dim() == 2,
      "kd_loss: student logits must have shape [B, C], got ",
      student.sizes());
  TORCH_CHECK(
      teacher.sizes() == student.sizes(),
      "kd_loss: teacher logits must have the student's shape ",
      student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK(
      teacher.scalar_type() == student.scalar_type(),
      "kd_loss: student and teacher logits must have the same dtype, got ",
      student.scalar_type(), " and ", teacher.scalar_type());
  const auto dt = student.scalar_type();
  TORCH_CHECK(
      dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
      "kd_loss: logits must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(
      teacher.device() == student.device(),
      "kd_loss: student and teacher logits must be on the same device, got ",
      student.device(), " and ", teacher.device());
  TORCH_CHECK(student.size(0) >= 1, "kd_loss: need at least one row (B >= 1)");
  TORCH_CHECK(student.size(1) >= 1, "kd_loss: need at least one class (C >= 1)");
  TORCH_CHECK(
      std::isfinite(temperature) && temperature > 0.0,
      "kd_loss: temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(
      std::isfinite(alpha) && alpha >= 0.0 && alpha <= 1.0,
      "kd_loss: alpha must be in [0, 1], got ", alpha);

  KdLossPlan plan;
  plan.B = student.size(0);
  plan.C = student.size(1);
  plan.temperature = temperature;
  plan.ignore_index = ignore_index;
  plan.grad_student = grad_student;
  plan.grad_teacher = grad_teacher;
  if (labels.has_value() && labels->defined()) {
    const auto& l = *labels;
    TORCH_CHECK(
        l.dim() == 1 && l.size(0) == plan.B,
        "kd_loss: labels must have shape [B] = [", plan.B, "], got ", l.sizes());
    TORCH_CHECK(
        l.scalar_type() == at::kLong,
        "kd_loss: labels must be int64 (torch.long), got ", l.scalar_type());
    TORCH_CHECK(
        l.device() == student.device(),
        "kd_loss: labels must be on the logits' device ", student.device(),
        ", got ", l.device());
    plan.kd_weight = alpha;
    plan.ce_weight = 1.0 - alpha;
    plan.use_ce = plan.ce_weight > 0.0;
  } else {
    TORCH_CHECK(
        alpha == 1.0,
        "kd_loss: alpha < 1 weights a cross-entropy term and needs labels; "
        "got alpha=", alpha, " and labels=None");
    plan.kd_weight = 1.0;
    plan.ce_weight = 0.0;
    plan.use_ce = false;
  }
  return plan;
}

at::Tensor empty_grad(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

TORCH_LIBRARY(pyramidkd, m) {
  // Returns (loss, grad_student, grad_teacher).  The loss is a 0-dim tensor of
  // the logits' dtype (accumulated in fp32, or fp64 for fp64 logits).  The
  // gradients of the loss w.r.t. the logits are computed in the same pass
  // when requested, as contiguous [B, C] tensors; otherwise they are empty
  // ([0]) placeholders.  The autograd formula (registered in Python) only
  // scales them by grad_output.
  m.def(
      "kd_loss_fwd(Tensor student, Tensor teacher, Tensor? labels, "
      "float temperature, float alpha, int ignore_index, "
      "bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)");
}

}  // namespace pyramidkd
