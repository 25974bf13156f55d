// Shared declarations for the fused distillation loss (pyramidkd::kd_loss_fwd).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace pyramidkd {

// Device-independent description of one call.
struct KdLossPlan {
  int64_t B = 0;
  int64_t C = 0;
  double temperature = 1.0;
  double kd_weight = 1.0;  // alpha, or 1 without labels
  double ce_weight = 0.0;  // 1 - alpha with labels, else 0
  bool use_ce = false;     // labels given and ce_weight > 0
  bool grad_student = false;
  bool grad_teacher = false;
  int64_t ignore_index = -100;
};

// Derives the plan, checking only what keeps the kernels in bounds (sizes,
// dtypes, devices); the argument rules are checked in Python
// (pyramidkd.engine.ops.check_kd_loss_args).  Shared by the CPU and CUDA
// implementations.
KdLossPlan make_plan(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index,
    bool grad_student,
    bool grad_teacher);

// An empty placeholder returned for a gradient that was not requested.
at::Tensor empty_grad(const at::Tensor& like);

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index,
    bool grad_student,
    bool grad_teacher);

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cuda(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index,
    bool grad_student,
    bool grad_teacher);
#endif

}  // namespace pyramidkd
