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

// Columns of the per-row statistics of kd_loss_stats (an opaque buffer that
// only kd_loss_bwd of the same device reads): on CUDA the merged row state
// (max s, max t, Zs, Zt, W, Zr) and the row's KL and cross-entropy terms.
constexpr int64_t kStatsCols = 8;

// dtype of the loss and of the row statistics: float64 for float64 logits,
// else float32 (fp16/bf16 logits give an fp32 loss, as eager autocast does).
at::ScalarType stats_dtype(at::ScalarType logits);

// Memory-safety checks of kd_loss_bwd's grad_loss (one element on the
// logits' device) and row_stats ([B, kStatsCols], contiguous, stats_dtype).
void check_bwd_buffers(
    const at::Tensor& grad_loss, const at::Tensor& row_stats, const KdLossPlan& plan, const at::Tensor& like);

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index,
    bool grad_student,
    bool grad_teacher);

// The two halves of the differentiable path on CUDA (see kd_loss.cpp).
std::tuple<at::Tensor, at::Tensor> kd_loss_stats_cpu(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index);

std::tuple<at::Tensor, at::Tensor> kd_loss_bwd_cpu(
    const at::Tensor& grad_loss,
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    const at::Tensor& row_stats,
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
