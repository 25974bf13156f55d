// CPU implementation of pyramidkd::kd_loss_fwd.
//
// Rows are split over threads with at::parallel_for; each row is handled by a
// vectorised kernel (kd_loss_cpu_kernel.h) compiled for DEFAULT (here), AVX2
// and AVX512 and chosen at run time from the CPU's features, so the shipped
// build needs no -march flag.  float64 runs a scalar kernel in double
// precision (it exists for gradcheck).  Per-row results go to a [B] buffer
// and are summed in row order, so the loss is bitwise reproducible and does
// not depend on the number of threads.

// Baseline build of the vectorised row kernel.  CPU_CAPABILITY names the
// inline namespace of at::vec; defining it here keeps the DEFAULT symbols
// apart from the AVX2/AVX512 ones.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define PYRAMIDKD_ROWS_FN kd_rows_default
#include "kd_loss_cpu_kernel.h"
#undef PYRAMIDKD_ROWS_FN

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cctype>
#include <cstring>
#include <string>
#include <vector>

#include "../kd_loss.h"
#include "kd_loss_cpu.h"

namespace pyramidkd {
namespace cpu {
namespace {

bool cpu_has(const char* feature) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c");
  }
  if (std::strcmp(feature, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#else
  (void)feature;
#endif
  return false;
}

// Picks the kernel for the instruction set ATen itself uses on this CPU
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY), so that we
// follow its judgement of where AVX512 pays.  PYRAMIDKD_CPU_CAPABILITY
// (default | avx2 | avx512) overrides it, e.g. to test the fallbacks; a
// choice the CPU cannot run falls back to the next narrower one.
struct Selected {
  KdRowsFn fn;
  const char* name;
};

Selected select_kernel() {
  std::string cap;
  if (const char* e = std::getenv("PYRAMIDKD_CPU_CAPABILITY")) {
    cap = e;
  } else {
    cap = at::get_cpu_capability();
  }
  for (auto& ch : cap) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (cap == "avx512" && kd_rows_avx512 != nullptr && cpu_has("avx512")) {
    return {kd_rows_avx512, "avx512"};
  }
  if ((cap == "avx512" || cap == "avx2") && kd_rows_avx2 != nullptr && cpu_has("avx2")) {
    return {kd_rows_avx2, "avx2"};
  }
  return {kd_rows_default, "default"};
}

const Selected& selected() {
  static const Selected s = select_kernel();
  return s;
}

// Double-precision scalar kernel (same algorithm as the vectorised one).
void kd_rows_double(
    const double* S,
    const double* Tt,
    int64_t s_stride,
    int64_t t_stride,
    const int64_t* labels,
    int64_t ignore_index,
    bool use_ce,
    int64_t C,
    double inv_T,
    double kd,
    double ce_scale,
    double* GS,
    double* GT,
    double* row_kl,
    double* row_ce,
    int64_t begin,
    int64_t end) {
  std::vector<double> eu(C), ev(C), er(C);
  for (int64_t r = begin; r < end; ++r) {
    const double* s = S + r * s_stride;
    const double* t = Tt + r * t_stride;
    double ms = s[0], mt = t[0];
    for (int64_t c = 1; c < C; ++c) {
      ms = std::max(ms, s[c]);
      mt = std::max(mt, t[c]);
    }
    double zs = 0, zt = 0, A = 0, zr = 0;
    for (int64_t c = 0; c < C; ++c) {
      const double v = (s[c] - ms) * inv_T;
      const double u = (t[c] - mt) * inv_T;
      ev[c] = std::exp(v);
      eu[c] = std::exp(u);
      zs += ev[c];
      zt += eu[c];
      if (eu[c] > 0) A += eu[c] * (u - v);  // teacher -inf (p = 0): no 0 * -inf
      if (use_ce) {
        er[c] = std::exp(s[c] - ms);
        zr += er[c];
      }
    }
    const double a_over_zt = A / zt;
    row_kl[r] = a_over_zt + std::log(zs) - std::log(zt);
    int64_t label = -1;
    if (use_ce && labels != nullptr && labels[r] != ignore_index) label = labels[r];
    row_ce[r] = label >= 0 ? std::log(zr) - (s[label] - ms) : 0.0;
    if (GS) {
      double* gs = GS + r * C;
      for (int64_t c = 0; c < C; ++c) {
        double g = kd * (ev[c] / zs - eu[c] / zt);
        if (label >= 0) g += ce_scale * er[c] / zr;
        gs[c] = g;
      }
      if (label >= 0) gs[label] -= ce_scale;
    }
    if (GT) {
      double* gt = GT + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const double d = ((t[c] - mt) - (s[c] - ms)) * inv_T;
        gt[c] = eu[c] > 0 ? kd * eu[c] / zt * (d - a_over_zt) : 0.0;
      }
    }
  }
}

// Rows of a [B, C] tensor with unit stride along C can be read in place;
// anything else is copied once.
at::Tensor rows_view(const at::Tensor& x) {
  if (x.stride(1) == 1 || x.size(1) == 1) return x;
  return x.contiguous();
}

int64_t row_stride(const at::Tensor& x) {
  return x.size(0) == 1 ? x.size(1) : x.stride(0);
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index,
    bool grad_student,
    bool grad_teacher) {
  const KdLossPlan plan = make_plan(
      student, teacher, labels, temperature, alpha, ignore_index, grad_student, grad_teacher);
  TORCH_INTERNAL_ASSERT(student.device().is_cpu());
  const int64_t B = plan.B, C = plan.C;
  const at::Tensor s = cpu::rows_view(student);
  const at::Tensor t = cpu::rows_view(teacher);

  // Labels: validated here (cheap, B values) and counted for the CE mean.
  at::Tensor lab;
  const int64_t* lab_ptr = nullptr;
  int64_t n_valid = 0;
  if (plan.use_ce) {
    lab = labels->contiguous();
    lab_ptr = lab.data_ptr<int64_t>();
    for (int64_t r = 0; r < B; ++r) {
      const int64_t l = lab_ptr[r];
      if (l == plan.ignore_index) continue;
      TORCH_CHECK(
          l >= 0 && l < C, "kd_loss: label ", l, " of row ", r, " is out of range [0, ", C,
          ") and is not ignore_index (", plan.ignore_index, ")");
      ++n_valid;
    }
  }
  // With every label ignored the cross-entropy term is defined as 0 (and so
  // is its gradient), where PyTorch's mean reduction would give nan.
  const double ce_grad_scale = (plan.use_ce && n_valid > 0) ? plan.ce_weight / n_valid : 0.0;
  const double kd_grad_scale = plan.kd_weight * temperature / static_cast<double>(B);

  at::Tensor gs = grad_student ? at::empty({B, C}, s.options()) : empty_grad(s);
  at::Tensor gt = grad_teacher ? at::empty({B, C}, s.options()) : empty_grad(s);
  std::vector<double> row_kl(B), row_ce(B);

  // Enough work per task to amortise the thread pool (~16k elements).
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  if (s.scalar_type() == at::kDouble) {
    const double* sp = s.const_data_ptr<double>();
    const double* tp = t.const_data_ptr<double>();
    double* gsp = grad_student ? gs.data_ptr<double>() : nullptr;
    double* gtp = grad_teacher ? gt.data_ptr<double>() : nullptr;
    const int64_t ss = cpu::row_stride(s), ts = cpu::row_stride(t);
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      cpu::kd_rows_double(
          sp, tp, ss, ts, lab_ptr, plan.ignore_index, plan.use_ce, C, 1.0 / temperature,
          kd_grad_scale, ce_grad_scale, gsp, gtp, row_kl.data(), row_ce.data(), begin, end);
    });
  } else {
    cpu::KdCpuArgs a;
    switch (s.scalar_type()) {
      case at::kFloat:
        a.dtype = cpu::KdDtype::Float;
        break;
      case at::kHalf:
        a.dtype = cpu::KdDtype::Half;
        break;
      default:
        a.dtype = cpu::KdDtype::BFloat16;
        break;
    }
    a.student = s.const_data_ptr();
    a.teacher = t.const_data_ptr();
    a.student_row_stride = cpu::row_stride(s);
    a.teacher_row_stride = cpu::row_stride(t);
    a.labels = lab_ptr;
    a.ignore_index = plan.ignore_index;
    a.C = C;
    a.inv_temperature = static_cast<float>(1.0 / temperature);
    a.kd_grad_scale = static_cast<float>(kd_grad_scale);
    a.ce_grad_scale = static_cast<float>(ce_grad_scale);
    a.use_ce = plan.use_ce;
    a.grad_student = grad_student ? gs.data_ptr() : nullptr;
    a.grad_teacher = grad_teacher ? gt.data_ptr() : nullptr;
    a.row_kl = row_kl.data();
    a.row_ce = row_ce.data();
    const cpu::KdRowsFn fn = cpu::selected().fn;
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  }

  // Fixed-order reduction over rows.
  double kl_sum = 0.0, ce_sum = 0.0;
  for (int64_t r = 0; r < B; ++r) kl_sum += row_kl[r];
  if (plan.use_ce) {
    for (int64_t r = 0; r < B; ++r) ce_sum += row_ce[r];
  }
  double loss = plan.kd_weight * temperature * temperature * kl_sum / static_cast<double>(B);
  if (plan.use_ce && n_valid > 0) loss += plan.ce_weight * ce_sum / static_cast<double>(n_valid);
  at::Tensor out = at::scalar_tensor(loss, s.options().dtype(stats_dtype(s.scalar_type())));
  return std::make_tuple(out, gs, gt);
}

// The CUDA training path's two ops, for the CPU: there are no statistics to
// keep (zeros of the documented shape), and the backward recomputes the
// gradients with the kernel above and scales them by grad_loss.
std::tuple<at::Tensor, at::Tensor> kd_loss_stats_cpu(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double alpha,
    int64_t ignore_index) {
  at::Tensor loss = std::get<0>(
      kd_loss_fwd_cpu(student, teacher, labels, temperature, alpha, ignore_index, false, false));
  return std::make_tuple(loss, at::zeros({student.size(0), kStatsCols}, loss.options()));
}

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
    bool grad_teacher) {
  const KdLossPlan plan = make_plan(
      student, teacher, labels, temperature, alpha, ignore_index, grad_student, grad_teacher);
  check_bwd_buffers(grad_loss, row_stats, plan, student);
  auto [loss, gs, gt] = kd_loss_fwd_cpu(
      student, teacher, labels, temperature, alpha, ignore_index, grad_student, grad_teacher);
  // A 0-dim CPU tensor multiplies as a scalar in the op's float math, so an
  // fp32 grad_loss of 65536 does not overflow fp16 gradients.
  const at::Tensor g = grad_loss.reshape({});
  if (grad_student) gs.mul_(g);
  if (grad_teacher) gt.mul_(g);
  return std::make_tuple(gs, gt);
}

// Name of the vectorised kernel in use (for benchmarks and bug reports).
std::string kd_loss_cpu_kernel_name() {
  return cpu::selected().name;
}

TORCH_LIBRARY_IMPL(pyramidkd, CPU, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cpu);
  m.impl("kd_loss_stats", &kd_loss_stats_cpu);
  m.impl("kd_loss_bwd", &kd_loss_bwd_cpu);
}

TORCH_LIBRARY_FRAGMENT(pyramidkd, m) {
  m.def("cpu_kernel_name() -> str", []() -> std::string { return kd_loss_cpu_kernel_name(); });
}

}  // namespace pyramidkd
