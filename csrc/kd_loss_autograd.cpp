// pyramidkd::kd_loss — the differentiable entry point used by
// pyramidkd.engine.ops.kd_loss.
//
// Its autograd kernel is C++ (an autograd Node, like ATen's own ops) to keep
// the per-call overhead of small losses low: it calls kd_loss_fwd below
// autograd with the gradient flags taken from the inputs, saves the gradients
// the forward produced, and its backward only multiplies them by grad_output
// (a device-side multiply, no host synchronisation).  Double backward raises.
// The same formula is the Python autograd kernel of kd_loss_fwd, for direct
// callers of the primitive (see docs/fused-loss.md for why both exist); fake
// kernels for both ops and the argument checks live in
// pyramidkd/engine/ops.py.

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

// Backward node: grad_s = saved_grad_s * grad_output (same for the teacher).
// When the engine announces that the graph is freed after this node
// (retain_graph=False, the usual case) the saved gradient buffer is scaled in
// place and handed on, which saves a [B, C] allocation and a memory pass;
// with retain_graph=True a new tensor is returned.  The saved gradient is an
// internal buffer of kd_loss_fwd that nothing else can see.
struct KdLossBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable grad_student_;
  torch::autograd::SavedVariable grad_teacher_;
  bool released_after_apply_ = false;

  std::string name() const override {
    return "KdLossBackward";
  }

  void will_release_variables() override {
    released_after_apply_ = true;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    grad_student_.reset_data();
    grad_teacher_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(
        !at::GradMode::is_enabled(),
        "pyramidkd kd_loss: double backward (create_graph=True, torch.func.grad, ...) is not "
        "supported by the fused op; use pyramidkd.engine.ops.kd_loss_eager (kd backend='eager')");
    variable_list out(2);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return out;
    for (size_t i = 0; i < 2; ++i) {
      if (!task_should_compute_output(i)) continue;
      auto& saved = i == 0 ? grad_student_ : grad_teacher_;
      at::Tensor g = saved.unpack();
      TORCH_CHECK(g.defined(), "kd_loss: gradient ", i, " was not computed in the forward");
      if (released_after_apply_ && is_plain_cpu(grad) && grad.numel() == 1 &&
          grad.item<double>() == 1.0) {
        // loss.backward(): on the CPU reading grad_output costs no device
        // sync, and skipping the multiply saves a pass over [B, C].
        out[i] = g;
        continue;
      }
      const at::Tensor scale = grad.to(g.scalar_type());
      out[i] = released_after_apply_ ? g.mul_(scale) : g * scale;
    }
    return out;
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
  at::Tensor loss, gs, gt;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(loss, gs, gt) = call_fwd(
        student, teacher, labels, temperature, alpha, ignore_index, track && grad_s, track && grad_t);
  }
  if (!track) return loss;
  auto node = c10::make_intrusive<KdLossBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(student, teacher));
  node->grad_student_ = torch::autograd::SavedVariable(grad_s ? gs : at::Tensor(), false);
  node->grad_teacher_ = torch::autograd::SavedVariable(grad_t ? gt : at::Tensor(), false);
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

TORCH_LIBRARY_FRAGMENT(pyramidkd, m) {
  m.def(
      "kd_loss(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
      "float alpha, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyramidkd, Autograd, m) {
  m.impl("kd_loss", &kd_loss_autograd);
}

TORCH_LIBRARY_IMPL(pyramidkd, CompositeExplicitAutograd, m) {
  m.impl("kd_loss", &kd_loss_no_grad);
}

}  // namespace pyramidkd
