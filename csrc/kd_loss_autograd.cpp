// pyramidkd::kd_loss — the differentiable entry point used by
// pyramidkd.engine.ops.kd_loss.
//
// Its autograd kernel is C++ (an autograd Node, like ATen's own ops) to keep
// the per-call overhead of small losses low.  Two strategies, by device:
//   CUDA: the forward runs kd_loss_stats (loss + [B, 8] row statistics) and
//     saves s, t, labels and the statistics; the backward runs kd_loss_bwd,
//     one kernel that recomputes the gradients and multiplies them by
//     grad_output read from device memory.  No saved [B, C] gradient, no
//     separate scaling pass, no host synchronisation; fp16 gradients are
//     rounded after the (GradScaler) scale, not before.
//   CPU: the forward kernel computes the gradients in its pass (it holds the
//     row in cache) and the backward scales them; when grad_output is a CPU
//     1 (reading it costs no device sync) the saved buffer is handed on as is.
// Host-device sync points: none on CUDA (grad_output, the valid-label count
// and the loss stay on the device); on the CPU grad_output.item() reads host
// memory.  Double backward raises.  The same CPU formula is the Python autograd kernel
// of kd_loss_fwd, for direct callers of the primitive (see docs/fused-loss.md
// for why both exist); fake kernels for the ops and the argument checks live
// in pyramidkd/engine/ops.py.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <string>

#include <tuple>

#include "kd_loss.h"

namespace pyramidkd {
namespace {

using torch::autograd::variable_list;

using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&,
    const at::Tensor&,
    const std::optional<at::Tensor>&,
    double,
    double,
    int64_t,
    bool,
    bool);

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fwd(
    const at::Tensor& s,
    const at::Tensor& t,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index,
    bool grad_s,
    bool grad_t) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyramidkd::kd_loss_fwd", "")
                             .typed<FwdSig>();
  return op.call(s, t, labels, temperature, alpha, ignore_index, grad_s, grad_t);
}

using StatsSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double, int64_t);

using BwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const std::optional<at::Tensor>&,
    const at::Tensor&,
    double,
    double,
    int64_t,
    bool,
    bool);

std::tuple<at::Tensor, at::Tensor> call_stats(
    const at::Tensor& s,
    const at::Tensor& t,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyramidkd::kd_loss_stats", "")
                             .typed<StatsSig>();
  return op.call(s, t, labels, temperature, alpha, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> call_bwd(
    const at::Tensor& grad,
    const at::Tensor& s,
    const at::Tensor& t,
    const std::optional<at::Tensor>& labels,
    const at::Tensor& stats,
    double temperature,
    double alpha,
    int64_t ignore_index,
    bool grad_s,
    bool grad_t) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyramidkd::kd_loss_bwd", "")
                             .typed<BwdSig>();
  return op.call(grad, s, t, labels, stats, temperature, alpha, ignore_index, grad_s, grad_t);
}

// A real CPU tensor whose value can be read on the host: not a fake,
// functional or subclass tensor, and no Python dispatch mode is tracing
// (torch.compile / export trace the backward with such tensors).
bool is_plain_cpu(const at::Tensor& x) {
  const c10::DispatchKeySet ks = x.key_set();
  return x.is_cpu() && x.has_storage() && !ks.has(c10::DispatchKey::Python) &&
      !ks.has(c10::DispatchKey::Functionalize) &&
      !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python) &&
      !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::PythonDispatcher);
}

const char* const kDoubleBackward =
    "pyramidkd kd_loss: double backward (create_graph=True, torch.func.grad, ...) is not "
    "supported by the fused op; use pyramidkd.engine.ops.kd_loss_eager (kd backend='eager')";

// Backward node.  CUDA (recompute_): kd_loss_bwd from the saved inputs and
// row statistics.  CPU: grad = saved_grad * grad_output; when the engine
// announces that the graph is freed after this node (retain_graph=False, the
// usual case) the saved buffer is scaled in place and handed on, which saves
// a [B, C] allocation; with retain_graph=True a new tensor is returned.  The
// saved gradient is an internal buffer of kd_loss_fwd that nothing else sees.
struct KdLossBackward : public torch::autograd::Node {
  bool recompute_ = false;
  torch::autograd::SavedVariable grad_student_, grad_teacher_;     // CPU
  torch::autograd::SavedVariable student_, teacher_, labels_, stats_;  // CUDA
  double temperature_ = 1.0, alpha_ = 1.0;
  int64_t ignore_index_ = -100;
  bool released_after_apply_ = false;

  std::string name() const override {
    return "KdLossBackward";
  }

  void will_release_variables() override {
    released_after_apply_ = true;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* v : {&grad_student_, &grad_teacher_, &student_, &teacher_, &labels_, &stats_}) v->reset_data();
  }

  variable_list recompute(const at::Tensor& grad) {
    variable_list out(2);
    const bool need_s = task_should_compute_output(0), need_t = task_should_compute_output(1);
    if (!need_s && !need_t) return out;
    const at::Tensor labels = labels_.unpack();
    auto [gs, gt] = call_bwd(
        grad, student_.unpack(), teacher_.unpack(),
        labels.defined() ? std::optional<at::Tensor>(labels) : std::nullopt, stats_.unpack(), temperature_,
        alpha_, ignore_index_, need_s, need_t);
    if (need_s) out[0] = gs;
    if (need_t) out[1] = gt;
    return out;
  }

  variable_list scale_saved(const at::Tensor& grad) {
    variable_list out(2);
    for (size_t i = 0; i < 2; ++i) {
      if (!task_should_compute_output(i)) continue;
      auto& saved = i == 0 ? grad_student_ : grad_teacher_;
      at::Tensor g = saved.unpack();
      TORCH_CHECK(g.defined(), "kd_loss: gradient ", i, " was not computed in the forward");
      if (released_after_apply_ && is_plain_cpu(grad) && grad.numel() == 1 && grad.item<double>() == 1.0) {
        // loss.backward(): on the CPU reading grad_output costs no device
        // sync, and skipping the multiply saves a pass over [B, C].
        out[i] = g;
        continue;
      }
      // grad (fp32 for fp16/bf16 logits) is a 0-dim CPU tensor: multiplied as
      // a scalar in float, so GradScaler's 65536 does not overflow fp16.
      out[i] = released_after_apply_ ? g.mul_(grad) : g * grad;
    }
    return out;
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(!at::GradMode::is_enabled(), kDoubleBackward);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return variable_list(2);
    return recompute_ ? recompute(grad) : scale_saved(grad);
  }
};

at::Tensor kd_loss_autograd(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index) {
  const bool grad_s = student.requires_grad();
  const bool grad_t = teacher.requires_grad();
  const bool track = at::GradMode::is_enabled() && (grad_s || grad_t);
  auto node = c10::make_intrusive<KdLossBackward>();
  node->recompute_ = student.is_cuda();  // also for fake CUDA tensors (torch.compile)
  at::Tensor loss, gs, gt, stats;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (track && node->recompute_) {
      std::tie(loss, stats) = call_stats(student, teacher, labels, temperature, alpha, ignore_index);
    } else {
      std::tie(loss, gs, gt) = call_fwd(
          student, teacher, labels, temperature, alpha, ignore_index, track && grad_s, track && grad_t);
    }
  }
  if (!track) return loss;
  node->set_next_edges(torch::autograd::collect_next_edges(student, teacher));
  if (node->recompute_) {
    // Saved as inputs: an in-place change of the logits before the backward
    // is an error (version counter), not a silently wrong gradient.
    node->student_ = torch::autograd::SavedVariable(student, false);
    node->teacher_ = torch::autograd::SavedVariable(teacher, false);
    node->labels_ = torch::autograd::SavedVariable(labels.value_or(at::Tensor()), false);
    node->stats_ = torch::autograd::SavedVariable(stats, false);
    node->temperature_ = temperature;
    node->alpha_ = alpha;
    node->ignore_index_ = ignore_index;
  } else {
    node->grad_student_ = torch::autograd::SavedVariable(grad_s ? gs : at::Tensor(), false);
    node->grad_teacher_ = torch::autograd::SavedVariable(grad_t ? gt : at::Tensor(), false);
  }
  torch::autograd::set_history(loss, node);
  return loss;
}

// Below autograd (inference mode, fake/meta tracing, ...): loss only.
at::Tensor kd_loss_no_grad(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index) {
  return std::get<0>(call_fwd(student, teacher, labels, temperature, alpha, ignore_index, false, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyramidkd, Autograd, m) {
  m.impl("kd_loss", &kd_loss_autograd);
}

TORCH_LIBRARY_IMPL(pyramidkd, CompositeExplicitAutograd, m) {
  m.impl("kd_loss", &kd_loss_no_grad);
}

}  // namespace pyramidkd
