// CUDA implementation of pyramidkd::kd_loss_fwd, kd_loss_stats and kd_loss_bwd.
//
// Forward (kd_stats_*_kernel): one online pass per row over s and t keeps,
// per thread, the running maxima and the sums of kd_loss_row.cuh; thread
// states merge in warp butterflies and, for the block kernel, across warps
// through shared memory.  The row's merged state and its loss terms go to a
// [B, 8] "row stats" buffer; one block sums the loss terms in a fixed order.
//   C <= 1024: one warp per row, 8 rows per 256-thread block;
//   C >  1024: one block (128..1024 threads) per row.
// Backward (kd_grad_kernel): an elementwise pass that recomputes the
// gradient from s, t and the row stats and multiplies it by grad_output,
// read from device memory -- no saved [B, C] gradient, no second pass to
// scale it, no host read of grad_output.
//
// Bytes each kernel must move (e = bytes per logit; 4 for fp32, 2 for bf16):
//   stats:    reads 2 B C e (s, t), writes 32 B (fp32 stats)
//   grad:     reads 2 B C e + 32 B, writes B C e per requested gradient
//   count / finalize: O(B)
// so one training step (student gradient only) moves 5 B C e: 2.6 GB at
// 4096 x 32000 fp32 (1.05 GB forward, 1.57 GB backward); see
// docs/fused-loss.md for the bandwidth target.
//
// Loads are 16-byte vectors (float4 / 8 halves / 2 doubles) with a scalar
// head and tail when rows are not 16-byte aligned; offsets are int64.
//
// Host-device synchronisation: none.  Every launch is on the current stream;
// the valid-label count, grad_output and the loss stay on the device, and a
// bad label makes its row (so the loss) NaN instead of a device assert,
// which would kill the CUDA context.

// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in the
// cuBLAS/cuSPARSE headers): the sources compile with a bare nvcc toolkit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>

#include "../kd_loss.h"
#include "kd_loss_row.cuh"

namespace pyramidkd {
namespace {

using namespace row;

constexpr int kWarpRowsPerBlock = 8;  // warp-per-row kernels: 8 rows per block
constexpr int64_t kWarpMaxC = 1024;   // largest C handled by one warp
constexpr int kFinalizeThreads = 512;
constexpr int kGradThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> warp_allreduce(RowStats<acc_t> st, acc_t inv_T, bool ce) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    RowStats<acc_t> o;
    o.ms = __shfl_xor_sync(0xffffffffu, st.ms, offset);
    o.mt = __shfl_xor_sync(0xffffffffu, st.mt, offset);
    o.zs = __shfl_xor_sync(0xffffffffu, st.zs, offset);
    o.zt = __shfl_xor_sync(0xffffffffu, st.zt, offset);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, offset);
    o.zr = __shfl_xor_sync(0xffffffffu, st.zr, offset);
    st = merge(st, o, inv_T, ce);
  }
  return st;
}

template <typename scalar_t>
struct StatsParams {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* s;
  const scalar_t* t;
  int64_t s_stride;  // row strides, in elements
  int64_t t_stride;
  const int64_t* labels;  // nullptr without cross-entropy
  int64_t ignore_index;
  int64_t B;
  int64_t C;
  acc_t inv_T;
  bool use_ce;
  acc_t* stats;  // [B, kStatsCols]
};

// Stores a row's merged state and its loss terms (KL, cross-entropy).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row(const StatsParams<scalar_t>& p, int64_t row, const RowStats<acc_t>& st) {
  acc_t* out = p.stats + row * kStatsCols;
  out[0] = st.ms;
  out[1] = st.mt;
  out[2] = st.zs;
  out[3] = st.zt;
  out[4] = st.w;
  out[5] = st.zr;
  out[6] = row_kl(st);
  acc_t ce = acc_t(0);
  if (p.use_ce) {
    const int64_t l = classify_label(p.labels[row], p.ignore_index, p.C);
    if (l == kBadLabel) {
      ce = static_cast<acc_t>(NAN);
    } else if (l != kNoLabel) {
      ce = row_ce(st, static_cast<acc_t>(p.s[row * p.s_stride + l]));
    }
  }
  out[7] = ce;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarp* kWarpRowsPerBlock) kd_stats_warp_kernel(const StatsParams<scalar_t> p) {
  using acc_t = typename AccType<scalar_t>::type;
  const int lane = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.B) return;  // uniform per warp
  const RowSplit sp = split_row<VEC>(row, p.C);
  RowStats<acc_t> st = accumulate_row<scalar_t, acc_t, VEC>(
      p.s + row * p.s_stride, p.t + row * p.t_stride, sp, lane, kWarp, p.inv_T, p.use_ce);
  st = warp_allreduce(st, p.inv_T, p.use_ce);
  if (lane == 0) store_row(p, row, st);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(1024) kd_stats_block_kernel(const StatsParams<scalar_t> p) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ RowStats<acc_t> partial[32];
  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int64_t row = blockIdx.x;
  const RowSplit sp = split_row<VEC>(row, p.C);
  RowStats<acc_t> st = accumulate_row<scalar_t, acc_t, VEC>(
      p.s + row * p.s_stride, p.t + row * p.t_stride, sp, tid, blockDim.x, p.inv_T, p.use_ce);
  st = warp_allreduce(st, p.inv_T, p.use_ce);
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < nwarps ? partial[lane] : empty_stats<acc_t>();
    st = warp_allreduce(st, p.inv_T, p.use_ce);
    if (lane == 0) store_row(p, row, st);
  }
}

template <typename scalar_t>
struct GradParams {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* s;
  const scalar_t* t;
  int64_t s_stride;
  int64_t t_stride;
  const int64_t* labels;   // nullptr without cross-entropy
  const int64_t* n_valid;  // device scalar: number of non-ignored labels
  int64_t ignore_index;
  int64_t B;
  int64_t C;
  acc_t inv_T;
  acc_t kd_grad;  // kd_weight * T / B
  double ce_weight;
  bool use_ce;
  const acc_t* stats;        // [B, kStatsCols] from the forward
  const acc_t* grad_output;  // device scalar; nullptr means 1
  scalar_t* gs;              // [B, C] contiguous or nullptr
  scalar_t* gt;
};

// Rows step by gridDim.y * blockDim.y; threads of one row are
// (blockIdx.x, threadIdx.x): one warp per row for C <= 1024 (block 32 x 8),
// else 256-thread blocks side by side along the row.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kGradThreads) kd_grad_kernel(const GradParams<scalar_t> p) {
  using acc_t = typename AccType<scalar_t>::type;
  const acc_t g = p.grad_output ? *p.grad_output : acc_t(1);
  acc_t ce_scale = acc_t(0);
  if (p.use_ce) {
    const int64_t n = *p.n_valid;
    ce_scale = n > 0 ? static_cast<acc_t>(p.ce_weight / static_cast<double>(n)) : acc_t(0);
  }
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < p.B; row += row_step) {
    const acc_t* x = p.stats + row * kStatsCols;
    const RowStats<acc_t> st{x[0], x[1], x[2], x[3], x[4], x[5]};
    const int64_t label = p.use_ce ? classify_label(p.labels[row], p.ignore_index, p.C) : kNoLabel;
    const RowFinal<acc_t> f = make_final(st, p.inv_T, p.use_ce, g, p.kd_grad, ce_scale, label);
    write_grads_row<scalar_t, acc_t, VEC>(
        p.s + row * p.s_stride, p.t + row * p.t_stride, p.gs ? p.gs + row * p.C : nullptr,
        p.gt ? p.gt + row * p.C : nullptr, split_row<VEC>(row, p.C), f, tid, nthreads);
  }
}

// Number of labels != ignore_index (one block, fixed-order reduction).
__global__ void __launch_bounds__(kFinalizeThreads)
    kd_count_valid_kernel(const int64_t* labels, int64_t B, int64_t ignore_index, int64_t* out) {
  __shared__ int64_t buf[kFinalizeThreads];
  int64_t n = 0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) n += labels[i] != ignore_index;
  buf[threadIdx.x] = n;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = buf[0];
}

// loss = kd_scale * sum(row_kl) + ce_weight * sum(row_ce) / n_valid, summed
// in double in a fixed order (deterministic).
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads) kd_finalize_kernel(
    const acc_t* stats, int64_t B, const int64_t* n_valid, double kd_scale, double ce_weight, bool use_ce,
    acc_t* out) {
  __shared__ double kl_buf[kFinalizeThreads];
  __shared__ double ce_buf[kFinalizeThreads];
  double kl = 0.0, ce = 0.0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    kl += static_cast<double>(stats[i * kStatsCols + 6]);
    if (use_ce) ce += static_cast<double>(stats[i * kStatsCols + 7]);
  }
  kl_buf[threadIdx.x] = kl;
  ce_buf[threadIdx.x] = ce;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      kl_buf[threadIdx.x] += kl_buf[threadIdx.x + stride];
      ce_buf[threadIdx.x] += ce_buf[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double loss = kd_scale * kl_buf[0];
    if (use_ce) {
      const int64_t n = *n_valid;
      if (n > 0) loss += ce_weight * ce_buf[0] / static_cast<double>(n);
    }
    *out = static_cast<acc_t>(loss);
  }
}

int64_t row_stride(const at::Tensor& x) {
  return x.size(0) == 1 ? x.size(1) : x.stride(0);
}

// One call's inputs as the kernels read them.
struct Prepared {
  KdLossPlan plan;
  at::Tensor s, t, lab, n_valid;
  cudaStream_t stream;
};

Prepared prepare(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    double temperature, double alpha, int64_t ignore_index, bool grad_student, bool grad_teacher) {
  Prepared pr;
  pr.plan = make_plan(student, teacher, labels, temperature, alpha, ignore_index, grad_student, grad_teacher);
  TORCH_INTERNAL_ASSERT(student.is_cuda());
  pr.stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();
  const int64_t C = pr.plan.C;
  pr.s = (student.stride(1) == 1 || C == 1) ? student : student.contiguous();
  pr.t = (teacher.stride(1) == 1 || C == 1) ? teacher : teacher.contiguous();
  pr.n_valid = at::zeros({1}, pr.s.options().dtype(at::kLong));  // a memset on the stream
  if (pr.plan.use_ce) {
    pr.lab = labels->contiguous();
    kd_count_valid_kernel<<<1, kFinalizeThreads, 0, pr.stream>>>(
        pr.lab.const_data_ptr<int64_t>(), pr.plan.B, pr.plan.ignore_index, pr.n_valid.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return pr;
}

// 16-byte packs need s, t and the (contiguous) gradient rows to share one
// misalignment: 16-byte aligned bases and row strides == C (mod VEC).
template <int VEC>
bool vec_ok(const Prepared& pr, const void* gs, const void* gt) {
  auto aligned = [](const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const int64_t C = pr.plan.C;
  return aligned(pr.s.const_data_ptr()) && aligned(pr.t.const_data_ptr()) && aligned(gs) && aligned(gt) &&
      (row_stride(pr.s) - C) % VEC == 0 && (row_stride(pr.t) - C) % VEC == 0;
}

template <typename scalar_t, int VEC>
void launch_stats(const StatsParams<scalar_t>& p, cudaStream_t stream) {
  if (p.C <= kWarpMaxC) {
    const dim3 block(kWarp, kWarpRowsPerBlock);
    const int64_t blocks = (p.B + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
    TORCH_CHECK(blocks <= 0x7fffffff, "kd_loss: too many rows");
    kd_stats_warp_kernel<scalar_t, VEC><<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
  } else {
    // Enough threads for ~4 packs each, 128..1024.
    const int64_t packs = (p.C + VEC - 1) / VEC;
    int threads = 128;
    while (threads < 1024 && static_cast<int64_t>(threads) * 4 < packs) threads *= 2;
    TORCH_CHECK(p.B <= 0x7fffffff, "kd_loss: too many rows");
    kd_stats_block_kernel<scalar_t, VEC><<<static_cast<unsigned>(p.B), threads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Row stats [B, kStatsCols] and the 0-dim loss (fp32, fp64 for fp64 logits).
std::tuple<at::Tensor, at::Tensor> run_stats(const Prepared& pr) {
  const KdLossPlan& plan = pr.plan;
  const auto acc_dtype = stats_dtype(pr.s.scalar_type());
  at::Tensor stats = at::empty({plan.B, kStatsCols}, pr.s.options().dtype(acc_dtype));
  at::Tensor out = at::empty({}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.s.scalar_type(), "kd_loss_stats_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    StatsParams<scalar_t> p;
    p.s = pr.s.const_data_ptr<scalar_t>();
    p.t = pr.t.const_data_ptr<scalar_t>();
    p.s_stride = row_stride(pr.s);
    p.t_stride = row_stride(pr.t);
    p.labels = plan.use_ce ? pr.lab.const_data_ptr<int64_t>() : nullptr;
    p.ignore_index = plan.ignore_index;
    p.B = plan.B;
    p.C = plan.C;
    p.inv_T = static_cast<acc_t>(1.0 / plan.temperature);
    p.use_ce = plan.use_ce;
    p.stats = stats.data_ptr<acc_t>();
    constexpr int VEC = 16 / sizeof(scalar_t);
    if (vec_ok<VEC>(pr, nullptr, nullptr)) {
      launch_stats<scalar_t, VEC>(p, pr.stream);
    } else {
      launch_stats<scalar_t, 1>(p, pr.stream);
    }
    const double T = plan.temperature;
    kd_finalize_kernel<acc_t><<<1, kFinalizeThreads, 0, pr.stream>>>(
        p.stats, plan.B, pr.n_valid.const_data_ptr<int64_t>(), plan.kd_weight * T * T / static_cast<double>(plan.B),
        plan.ce_weight, plan.use_ce, out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(out, stats);
}

template <typename scalar_t, int VEC>
void launch_grads(const GradParams<scalar_t>& p, cudaStream_t stream) {
  const int64_t C = p.C;
  dim3 block(kGradThreads, 1), grid(1, 1);
  if (C <= kWarpMaxC) {
    block = dim3(kWarp, kGradThreads / kWarp);
    grid.y = static_cast<unsigned>(std::min<int64_t>((p.B + block.y - 1) / block.y, kMaxGridY));
  } else {
    const int64_t per_block = static_cast<int64_t>(kGradThreads) * VEC * 4;  // ~4 packs a thread
    grid.x = static_cast<unsigned>((C + per_block - 1) / per_block);
    grid.y = static_cast<unsigned>(std::min<int64_t>(p.B, kMaxGridY));
  }
  kd_grad_kernel<scalar_t, VEC><<<grid, block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grad_output: a device scalar of the stats' dtype, or undefined for 1.
void run_grads(const Prepared& pr, const at::Tensor& stats, const at::Tensor& grad_output, at::Tensor& gs,
               at::Tensor& gt) {
  const KdLossPlan& plan = pr.plan;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.s.scalar_type(), "kd_loss_grad_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    GradParams<scalar_t> p;
    p.s = pr.s.const_data_ptr<scalar_t>();
    p.t = pr.t.const_data_ptr<scalar_t>();
    p.s_stride = row_stride(pr.s);
    p.t_stride = row_stride(pr.t);
    p.labels = plan.use_ce ? pr.lab.const_data_ptr<int64_t>() : nullptr;
    p.n_valid = pr.n_valid.const_data_ptr<int64_t>();
    p.ignore_index = plan.ignore_index;
    p.B = plan.B;
    p.C = plan.C;
    p.inv_T = static_cast<acc_t>(1.0 / plan.temperature);
    p.kd_grad = static_cast<acc_t>(plan.kd_weight * plan.temperature / static_cast<double>(plan.B));
    p.ce_weight = plan.ce_weight;
    p.use_ce = plan.use_ce;
    p.stats = stats.const_data_ptr<acc_t>();
    p.grad_output = grad_output.defined() ? grad_output.const_data_ptr<acc_t>() : nullptr;
    p.gs = plan.grad_student ? gs.data_ptr<scalar_t>() : nullptr;
    p.gt = plan.grad_teacher ? gt.data_ptr<scalar_t>() : nullptr;
    constexpr int VEC = 16 / sizeof(scalar_t);
    if (vec_ok<VEC>(pr, p.gs, p.gt)) {
      launch_grads<scalar_t, VEC>(p, pr.stream);
    } else {
      launch_grads<scalar_t, 1>(p, pr.stream);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_loss_stats_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    double temperature, double alpha, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(student.device());
  const Prepared pr = prepare(student, teacher, labels, temperature, alpha, ignore_index, false, false);
  return run_stats(pr);
}

std::tuple<at::Tensor, at::Tensor> kd_loss_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels, const at::Tensor& row_stats, double temperature, double alpha,
    int64_t ignore_index, bool grad_student, bool grad_teacher) {
  const c10::cuda::CUDAGuard guard(student.device());
  const Prepared pr =
      prepare(student, teacher, labels, temperature, alpha, ignore_index, grad_student, grad_teacher);
  check_bwd_buffers(grad_loss, row_stats, pr.plan, pr.s);
  at::Tensor gs = grad_student ? at::empty({pr.plan.B, pr.plan.C}, pr.s.options()) : empty_grad(pr.s);
  at::Tensor gt = grad_teacher ? at::empty({pr.plan.B, pr.plan.C}, pr.s.options()) : empty_grad(pr.s);
  if (grad_student || grad_teacher) {
    // A no-op for the usual fp32 / fp64 grad_output; else a device-side cast.
    const at::Tensor g = grad_loss.to(row_stats.scalar_type()).reshape({});
    run_grads(pr, row_stats, g, gs, gt);
  }
  return std::make_tuple(gs, gt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    double temperature, double alpha, int64_t ignore_index, bool grad_student, bool grad_teacher) {
  const c10::cuda::CUDAGuard guard(student.device());
  const Prepared pr =
      prepare(student, teacher, labels, temperature, alpha, ignore_index, grad_student, grad_teacher);
  auto [loss, stats] = run_stats(pr);
  at::Tensor gs = grad_student ? at::empty({pr.plan.B, pr.plan.C}, pr.s.options()) : empty_grad(pr.s);
  at::Tensor gt = grad_teacher ? at::empty({pr.plan.B, pr.plan.C}, pr.s.options()) : empty_grad(pr.s);
  // Gradients with grad_output = 1, for direct callers of the primitive (the
  // training path, pyramidkd::kd_loss, runs kd_loss_stats + kd_loss_bwd).
  if (grad_student || grad_teacher) run_grads(pr, stats, at::Tensor(), gs, gt);
  return std::make_tuple(loss, gs, gt);
}

TORCH_LIBRARY_IMPL(pyramidkd, CUDA, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cuda);
  m.impl("kd_loss_stats", &kd_loss_stats_cuda);
  m.impl("kd_loss_bwd", &kd_loss_bwd_cuda);
}

}  // namespace pyramidkd
