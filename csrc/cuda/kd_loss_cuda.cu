// CUDA implementation of pyramidkd::kd_loss_fwd.
//
// Each row is reduced with a single online pass over s and t that keeps, per
// thread, the running maxima of s and t and the sums (relative to them)
//     Zs = sum e^v,  Zt = sum e^u,  W = sum e^u (u - v),  Zr = sum e^(s - max s)
// with u = (t - max t)/T and v = (s - max s)/T; when a maximum grows the sums
// are rescaled, and per-thread states are merged the same way (warp
// butterflies, then across warps through shared memory).  A second sweep over
// the row (served from L1/L2) writes the gradients.
//   C <= 1024: one warp per row, 8 rows per 256-thread block;
//   C >  1024: one block per row.
// Loads are 16-byte vectors (float4 / 8 halves / 2 doubles) with a scalar
// head and tail when rows are not 16-byte aligned; offsets are int64.
// Per-row results go to a [B] buffer that one block sums in a fixed order,
// so results are deterministic (no atomics) and nothing syncs with the host.

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

#include <cmath>
#include <cstdint>

#include "../kd_loss.h"

namespace pyramidkd {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpRowsPerBlock = 8;   // warp-per-row kernel: 8 rows per block
constexpr int64_t kWarpMaxC = 1024;    // largest C handled by one warp
constexpr int kFinalizeThreads = 512;

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

__device__ __forceinline__ float fast_exp(float x) {
  return __expf(x);
}
__device__ __forceinline__ double fast_exp(double x) {
  return ::exp(x);
}
__device__ __forceinline__ float acc_log(float x) {
  return ::logf(x);
}
__device__ __forceinline__ double acc_log(double x) {
  return ::log(x);
}

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -INFINITY;
}

template <typename acc_t>
struct RowStats {
  acc_t ms;  // running max of s (raw logits); -inf while empty
  acc_t mt;  // running max of t
  acc_t zs;  // sum exp((s - ms) / T)
  acc_t zt;  // sum exp((t - mt) / T)
  acc_t w;   // sum exp((t - mt) / T) * ((t - mt) - (s - ms)) / T
  acc_t zr;  // sum exp(s - ms)               (cross-entropy only)
};

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> empty_stats() {
  RowStats<acc_t> st;
  st.ms = neg_inf<acc_t>();
  st.mt = neg_inf<acc_t>();
  st.zs = st.zt = st.w = st.zr = acc_t(0);
  return st;
}

// Re-expresses the sums relative to new maxima nms >= ms, nmt >= mt.
template <typename acc_t>
__device__ __forceinline__ void rescale(RowStats<acc_t>& st, acc_t nms, acc_t nmt, acc_t inv_T, bool ce) {
  if (st.ms == neg_inf<acc_t>()) {  // empty
    st.ms = nms;
    st.mt = nmt;
    return;
  }
  if (nms == st.ms && nmt == st.mt) return;
  const acc_t dt = (st.mt - nmt) * inv_T;  // <= 0
  const acc_t ds = (st.ms - nms) * inv_T;  // <= 0
  const acc_t at = fast_exp(dt);
  st.w = at * (st.w + st.zt * (dt - ds));
  st.zt *= at;
  st.zs *= fast_exp(ds);
  if (ce) st.zr *= fast_exp(st.ms - nms);
  st.ms = nms;
  st.mt = nmt;
}

// Symmetric merge (bitwise identical for merge(a, b) and merge(b, a)), so a
// butterfly leaves every lane with the same state.
template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> merge(RowStats<acc_t> a, RowStats<acc_t> b, acc_t inv_T, bool ce) {
  if (a.ms == neg_inf<acc_t>()) return b;
  if (b.ms == neg_inf<acc_t>()) return a;
  const acc_t nms = a.ms > b.ms ? a.ms : b.ms;
  const acc_t nmt = a.mt > b.mt ? a.mt : b.mt;
  rescale(a, nms, nmt, inv_T, ce);
  rescale(b, nms, nmt, inv_T, ce);
  a.zs += b.zs;
  a.zt += b.zt;
  a.w += b.w;
  a.zr += b.zr;
  return a;
}

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

// Adds n (s, t) pairs to the state: one rescale per chunk.
template <typename acc_t, int N>
__device__ __forceinline__ void absorb(
    RowStats<acc_t>& st, const acc_t (&xs)[N], const acc_t (&xt)[N], acc_t inv_T, bool ce) {
  acc_t cms = xs[0], cmt = xt[0];
#pragma unroll
  for (int i = 1; i < N; ++i) {
    cms = xs[i] > cms ? xs[i] : cms;
    cmt = xt[i] > cmt ? xt[i] : cmt;
  }
  rescale(st, cms > st.ms ? cms : st.ms, cmt > st.mt ? cmt : st.mt, inv_T, ce);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const acc_t v = (xs[i] - st.ms) * inv_T;
    const acc_t u = (xt[i] - st.mt) * inv_T;
    const acc_t eu = fast_exp(u);
    st.zs += fast_exp(v);
    st.zt += eu;
    st.w += eu > acc_t(0) ? eu * (u - v) : acc_t(0);  // teacher -inf (p = 0): no 0 * -inf
    if (ce) st.zr += fast_exp(xs[i] - st.ms);
  }
}

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

template <typename scalar_t>
struct KdParams {
  const scalar_t* s;
  const scalar_t* t;
  int64_t s_stride;  // row strides, in elements
  int64_t t_stride;
  const int64_t* labels;   // nullptr without cross-entropy
  const int64_t* n_valid;  // device scalar: number of non-ignored labels
  int64_t ignore_index;
  int64_t B;
  int64_t C;
  double inv_T;
  double kd_grad;    // kd_weight * T / B
  double ce_weight;  // (1 - alpha), divided by n_valid on the device
  bool use_ce;
  scalar_t* gs;  // [B, C] contiguous or nullptr
  scalar_t* gt;
  typename AccType<scalar_t>::type* row_kl;  // [B]
  typename AccType<scalar_t>::type* row_ce;  // [B]
};

// Row layout for VEC-wide accesses: `head` scalar elements up to the first
// 16-byte boundary, `nvec` packs, then a scalar tail.  The host guarantees
// that s, t and the gradient rows share the same misalignment.
struct RowSplit {
  int64_t head;
  int64_t nvec;
  int64_t tail_begin;
  int64_t n_scalar;  // head + tail length
};

template <int VEC>
__device__ __forceinline__ RowSplit split_row(int64_t row, int64_t C) {
  RowSplit r;
  if (VEC == 1) {
    r.head = 0;
    r.nvec = C;
    r.tail_begin = C;
    r.n_scalar = 0;
    return r;
  }
  const int64_t mis = (row * C) % VEC;  // == misalignment of s and t rows too
  int64_t head = (VEC - mis) % VEC;
  head = head < C ? head : C;
  r.head = head;
  r.nvec = (C - head) / VEC;
  r.tail_begin = head + r.nvec * VEC;
  r.n_scalar = head + (C - r.tail_begin);
  return r;
}

__device__ __forceinline__ int64_t scalar_index(const RowSplit& r, int64_t k) {
  return k < r.head ? k : r.tail_begin + (k - r.head);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ RowStats<typename AccType<scalar_t>::type> accumulate_row(
    const KdParams<scalar_t>& p, int64_t row, const RowSplit& sp, int tid, int nthreads) {
  using acc_t = typename AccType<scalar_t>::type;
  const acc_t inv_T = static_cast<acc_t>(p.inv_T);
  const scalar_t* s = p.s + row * p.s_stride;
  const scalar_t* t = p.t + row * p.t_stride;
  RowStats<acc_t> st = empty_stats<acc_t>();
  for (int64_t j = tid; j < sp.nvec; j += nthreads) {
    const int64_t c = sp.head + j * VEC;
    const Pack<scalar_t, VEC> ps = *reinterpret_cast<const Pack<scalar_t, VEC>*>(s + c);
    const Pack<scalar_t, VEC> pt = *reinterpret_cast<const Pack<scalar_t, VEC>*>(t + c);
    acc_t xs[VEC], xt[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      xs[i] = static_cast<acc_t>(ps.v[i]);
      xt[i] = static_cast<acc_t>(pt.v[i]);
    }
    absorb<acc_t, VEC>(st, xs, xt, inv_T, p.use_ce);
  }
  for (int64_t k = tid; k < sp.n_scalar; k += nthreads) {
    const int64_t c = scalar_index(sp, k);
    const acc_t xs[1] = {static_cast<acc_t>(s[c])};
    const acc_t xt[1] = {static_cast<acc_t>(t[c])};
    absorb<acc_t, 1>(st, xs, xt, inv_T, p.use_ce);
  }
  return st;
}

template <typename acc_t>
struct RowFinal {
  acc_t ms, mt;
  acc_t inv_T;
  acc_t c_ev;   // kd / Zs
  acc_t c_eu;   // kd / Zt
  acc_t c_er;   // ce_scale / Zr
  acc_t w_over_zt;
  acc_t ce_scale;
  int64_t label;  // -1 when none
  bool ce;
  bool unit_T;
};

template <typename acc_t>
__device__ __forceinline__ void grad_elem(
    const RowFinal<acc_t>& f, acc_t xs, acc_t xt, int64_t c, acc_t& gs, acc_t& gt) {
  const acc_t ds = xs - f.ms;
  const acc_t v = ds * f.inv_T;
  const acc_t u = (xt - f.mt) * f.inv_T;
  const acc_t ev = fast_exp(v);
  const acc_t eu = fast_exp(u);
  gs = f.c_ev * ev - f.c_eu * eu;
  if (f.ce) {
    gs += f.c_er * (f.unit_T ? ev : fast_exp(ds));
    if (c == f.label) gs -= f.ce_scale;
  }
  gt = eu > acc_t(0) ? f.c_eu * eu * ((u - v) - f.w_over_zt) : acc_t(0);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void write_grads(
    const KdParams<scalar_t>& p,
    int64_t row,
    const RowSplit& sp,
    const RowFinal<typename AccType<scalar_t>::type>& f,
    int tid,
    int nthreads) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* s = p.s + row * p.s_stride;
  const scalar_t* t = p.t + row * p.t_stride;
  scalar_t* gs = p.gs ? p.gs + row * p.C : nullptr;
  scalar_t* gt = p.gt ? p.gt + row * p.C : nullptr;
  for (int64_t j = tid; j < sp.nvec; j += nthreads) {
    const int64_t c = sp.head + j * VEC;
    const Pack<scalar_t, VEC> ps = *reinterpret_cast<const Pack<scalar_t, VEC>*>(s + c);
    const Pack<scalar_t, VEC> pt = *reinterpret_cast<const Pack<scalar_t, VEC>*>(t + c);
    Pack<scalar_t, VEC> os, ot;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      acc_t a, b;
      grad_elem(f, static_cast<acc_t>(ps.v[i]), static_cast<acc_t>(pt.v[i]), c + i, a, b);
      os.v[i] = static_cast<scalar_t>(a);
      ot.v[i] = static_cast<scalar_t>(b);
    }
    if (gs) *reinterpret_cast<Pack<scalar_t, VEC>*>(gs + c) = os;
    if (gt) *reinterpret_cast<Pack<scalar_t, VEC>*>(gt + c) = ot;
  }
  for (int64_t k = tid; k < sp.n_scalar; k += nthreads) {
    const int64_t c = scalar_index(sp, k);
    acc_t a, b;
    grad_elem(f, static_cast<acc_t>(s[c]), static_cast<acc_t>(t[c]), c, a, b);
    if (gs) gs[c] = static_cast<scalar_t>(a);
    if (gt) gt[c] = static_cast<scalar_t>(b);
  }
}

// Turns the merged statistics of a row into its loss terms and gradient
// coefficients; the thread with `writer` set stores the per-row results.
template <typename scalar_t>
__device__ __forceinline__ RowFinal<typename AccType<scalar_t>::type> finish_row(
    const KdParams<scalar_t>& p, int64_t row, const RowStats<typename AccType<scalar_t>::type>& st, bool writer) {
  using acc_t = typename AccType<scalar_t>::type;
  RowFinal<acc_t> f;
  f.ms = st.ms;
  f.mt = st.mt;
  f.inv_T = static_cast<acc_t>(p.inv_T);
  f.unit_T = p.inv_T == 1.0;
  f.ce = p.use_ce;
  const acc_t kd = static_cast<acc_t>(p.kd_grad);
  f.c_ev = kd / st.zs;
  f.c_eu = kd / st.zt;
  f.w_over_zt = st.w / st.zt;
  f.label = -1;
  f.ce_scale = acc_t(0);
  f.c_er = acc_t(0);
  acc_t ce_row = acc_t(0);
  if (p.use_ce) {
    const int64_t n_valid = *p.n_valid;
    f.ce_scale = n_valid > 0 ? static_cast<acc_t>(p.ce_weight / static_cast<double>(n_valid)) : acc_t(0);
    const int64_t l = p.labels[row];
    if (l != p.ignore_index) {  // rows with an ignored label get no CE gradient
      CUDA_KERNEL_ASSERT(l >= 0 && l < p.C && "kd_loss: label out of range");
      f.c_er = f.ce_scale / st.zr;
      f.label = l;
      ce_row = acc_log(st.zr) - (static_cast<acc_t>(p.s[row * p.s_stride + l]) - st.ms);
    }
  }
  if (writer) {
    p.row_kl[row] = f.w_over_zt + acc_log(st.zs) - acc_log(st.zt);
    p.row_ce[row] = ce_row;
  }
  return f;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarp* kWarpRowsPerBlock) kd_warp_rows_kernel(const KdParams<scalar_t> p) {
  using acc_t = typename AccType<scalar_t>::type;
  const int lane = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.B) return;  // uniform per warp
  const RowSplit sp = split_row<VEC>(row, p.C);
  RowStats<acc_t> st = accumulate_row<scalar_t, VEC>(p, row, sp, lane, kWarp);
  st = warp_allreduce(st, static_cast<acc_t>(p.inv_T), p.use_ce);
  const RowFinal<acc_t> f = finish_row(p, row, st, lane == 0);
  if (p.gs || p.gt) write_grads<scalar_t, VEC>(p, row, sp, f, lane, kWarp);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(1024) kd_block_row_kernel(const KdParams<scalar_t> p) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ RowStats<acc_t> partial[32];
  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const int64_t row = blockIdx.x;
  const acc_t inv_T = static_cast<acc_t>(p.inv_T);
  const RowSplit sp = split_row<VEC>(row, p.C);
  RowStats<acc_t> st = accumulate_row<scalar_t, VEC>(p, row, sp, tid, blockDim.x);
  st = warp_allreduce(st, inv_T, p.use_ce);
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < nwarps ? partial[lane] : empty_stats<acc_t>();
    st = warp_allreduce(st, inv_T, p.use_ce);
    if (lane == 0) partial[0] = st;
  }
  __syncthreads();
  st = partial[0];
  const RowFinal<acc_t> f = finish_row(p, row, st, tid == 0);
  if (p.gs || p.gt) write_grads<scalar_t, VEC>(p, row, sp, f, tid, blockDim.x);
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
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads) kd_finalize_kernel(
    const acc_t* row_kl,
    const acc_t* row_ce,
    int64_t B,
    const int64_t* n_valid,
    double kd_scale,
    double ce_weight,
    bool use_ce,
    scalar_t* out) {
  __shared__ double kl_buf[kFinalizeThreads];
  __shared__ double ce_buf[kFinalizeThreads];
  double kl = 0.0, ce = 0.0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    kl += static_cast<double>(row_kl[i]);
    if (use_ce) ce += static_cast<double>(row_ce[i]);
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
    *out = static_cast<scalar_t>(loss);
  }
}

int64_t row_stride(const at::Tensor& x) {
  return x.size(0) == 1 ? x.size(1) : x.stride(0);
}

template <typename scalar_t, int VEC>
void launch_rows(const KdParams<scalar_t>& p, cudaStream_t stream) {
  if (p.C <= kWarpMaxC) {
    const dim3 block(kWarp, kWarpRowsPerBlock);
    const int64_t blocks = (p.B + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
    TORCH_CHECK(blocks <= 0x7fffffff, "kd_loss: too many rows");
    kd_warp_rows_kernel<scalar_t, VEC><<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
  } else {
    // Enough threads for ~4 packs each, 128..1024.
    const int64_t packs = (p.C + VEC - 1) / VEC;
    int threads = 128;
    while (threads < 1024 && static_cast<int64_t>(threads) * 4 < packs) threads *= 2;
    TORCH_CHECK(p.B <= 0x7fffffff, "kd_loss: too many rows");
    kd_block_row_kernel<scalar_t, VEC><<<static_cast<unsigned>(p.B), threads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cuda(
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
  TORCH_INTERNAL_ASSERT(student.is_cuda());
  const c10::cuda::CUDAGuard guard(student.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();
  const int64_t B = plan.B, C = plan.C;
  const at::Tensor s = (student.stride(1) == 1 || C == 1) ? student : student.contiguous();
  const at::Tensor t = (teacher.stride(1) == 1 || C == 1) ? teacher : teacher.contiguous();

  at::Tensor gs = grad_student ? at::empty({B, C}, s.options()) : empty_grad(s);
  at::Tensor gt = grad_teacher ? at::empty({B, C}, s.options()) : empty_grad(s);
  const auto acc_dtype = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor rows = at::empty({2, B}, s.options().dtype(acc_dtype));
  at::Tensor n_valid = at::zeros({1}, s.options().dtype(at::kLong));
  at::Tensor lab;
  if (plan.use_ce) {
    lab = labels->contiguous();
    kd_count_valid_kernel<<<1, kFinalizeThreads, 0, stream>>>(
        lab.const_data_ptr<int64_t>(), B, plan.ignore_index, n_valid.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor out = at::empty({}, s.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kd_loss_fwd_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    KdParams<scalar_t> p;
    p.s = s.const_data_ptr<scalar_t>();
    p.t = t.const_data_ptr<scalar_t>();
    p.s_stride = row_stride(s);
    p.t_stride = row_stride(t);
    p.labels = plan.use_ce ? lab.const_data_ptr<int64_t>() : nullptr;
    p.n_valid = n_valid.const_data_ptr<int64_t>();
    p.ignore_index = plan.ignore_index;
    p.B = B;
    p.C = C;
    p.inv_T = 1.0 / temperature;
    p.kd_grad = plan.kd_weight * temperature / static_cast<double>(B);
    p.ce_weight = plan.ce_weight;
    p.use_ce = plan.use_ce;
    p.gs = grad_student ? gs.data_ptr<scalar_t>() : nullptr;
    p.gt = grad_teacher ? gt.data_ptr<scalar_t>() : nullptr;
    p.row_kl = rows.data_ptr<acc_t>();
    p.row_ce = p.row_kl + B;

    // 16-byte packs need s, t and the (contiguous) gradient rows to share
    // one misalignment: 16-byte aligned bases and row strides == C (mod VEC).
    constexpr int VEC = 16 / sizeof(scalar_t);
    auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
    const bool vec_ok = aligned(p.s) && aligned(p.t) && (p.gs == nullptr || aligned(p.gs)) &&
        (p.gt == nullptr || aligned(p.gt)) && (p.s_stride - C) % VEC == 0 && (p.t_stride - C) % VEC == 0;
    if (vec_ok) {
      launch_rows<scalar_t, VEC>(p, stream);
    } else {
      launch_rows<scalar_t, 1>(p, stream);
    }
    kd_finalize_kernel<scalar_t, acc_t><<<1, kFinalizeThreads, 0, stream>>>(
        p.row_kl,
        p.row_ce,
        B,
        p.n_valid,
        plan.kd_weight * temperature * temperature / static_cast<double>(B),
        plan.ce_weight,
        plan.use_ce,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(out, gs, gt);
}

TORCH_LIBRARY_IMPL(pyramidkd, CUDA, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cuda);
}

}  // namespace pyramidkd
