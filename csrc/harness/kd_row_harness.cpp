// Host harness of the CUDA kernel's row logic (csrc/cuda/kd_loss_row.cuh).
//
// Replays, in the kernels' exact order, what the GPU threads of
// kd_loss_cuda.cu do with the shared __host__ __device__ functions: each
// thread's strided slice of a row (vector packs, then the scalar head and
// tail), the xor butterfly across 32 lanes (lane l merges lane l ^ offset,
// offsets 16, 8, 4, 2, 1), for the block kernel the merge across warps
// through "shared memory" (warp 0 reads lane 0 of every warp, empty states
// past the last warp), the per-row loss terms, the fixed-order loss sum and
// the gradient kernel (grad_output folded into the row coefficients).
//
// Plain C++, no torch: tests/test_kernel_harness.py compiles it with g++ into
// a shared library and calls kd_harness_run through ctypes on float rows (a
// bf16 input is passed as its exact float values, as the kernel converts it).
// Build without -ffast-math: -inf and NaN must behave as on the GPU.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kd_loss_row.cuh"

namespace {

using namespace pyramidkd::row;
using Stats = RowStats<float>;

constexpr int64_t kWarpMaxC = 1024;  // as kd_loss_cuda.cu
constexpr int kGradThreads = 256;

// The xor butterfly of warp_allreduce over one warp's 32 lane states.
// Returns false when the lanes do not end bitwise equal (the merge must be
// symmetric for every lane to hold the row's state).
bool butterfly(Stats* lane, float inv_T, bool ce) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    Stats next[kWarp];
    for (int l = 0; l < kWarp; ++l) next[l] = merge(lane[l], lane[l ^ offset], inv_T, ce);
    for (int l = 0; l < kWarp; ++l) lane[l] = next[l];
  }
  for (int l = 1; l < kWarp; ++l) {
    if (std::memcmp(&lane[l], &lane[0], sizeof(Stats)) != 0) return false;
  }
  return true;
}

// kd_stats_warp_kernel (threads == 0) or kd_stats_block_kernel (threads
// lanes, a multiple of 32 up to 1024) for one row.
template <int VEC>
bool reduce_row(const float* s, const float* t, int64_t row, int64_t C, int threads, float inv_T, bool ce,
                Stats& out) {
  const RowSplit sp = split_row<VEC>(row, C);
  const int n = threads == 0 ? kWarp : threads;
  std::vector<Stats> st(n);
  for (int tid = 0; tid < n; ++tid) st[tid] = accumulate_row<float, float, VEC>(s, t, sp, tid, n, inv_T, ce);
  bool uniform = true;
  for (int w0 = 0; w0 < n; w0 += kWarp) uniform = butterfly(&st[w0], inv_T, ce) && uniform;
  if (threads == 0) {
    out = st[0];
    return uniform;
  }
  Stats partial[kWarp];
  for (int l = 0; l < kWarp; ++l) partial[l] = l < n / kWarp ? st[l * kWarp] : empty_stats<float>();
  uniform = butterfly(partial, inv_T, ce) && uniform;
  out = partial[0];
  return uniform;
}

// Threads per row of kd_grad_kernel (launch_grads).
int64_t grad_threads(int64_t C, int vec) {
  if (C <= kWarpMaxC) return kWarp;
  const int64_t per_block = static_cast<int64_t>(kGradThreads) * vec * 4;
  return ((C + per_block - 1) / per_block) * kGradThreads;
}

// Block size the kernel picks for C (launch_stats): 0 for the warp kernel.
int auto_threads(int64_t C, int vec) {
  if (C <= kWarpMaxC) return 0;
  const int64_t packs = (C + vec - 1) / vec;
  int threads = 128;
  while (threads < 1024 && static_cast<int64_t>(threads) * 4 < packs) threads *= 2;
  return threads;
}

struct Call {
  const float* s;
  const float* t;
  int64_t B, C;
  const int64_t* labels;  // nullptr: no cross-entropy
  int64_t ignore_index;
  double temperature, alpha, grad_output;
  int threads;  // -1: the kernel's choice, 0: warp kernel, else block kernel
  float* gs;    // [B, C] or nullptr
  float* gt;
  float* stats;  // [B, 8] or nullptr
};

template <int VEC>
int run(const Call& c, double* loss) {
  const float inv_T = static_cast<float>(1.0 / c.temperature);
  const bool ce = c.labels != nullptr && 1.0 - c.alpha > 0.0;
  const double kd_weight = c.labels ? c.alpha : 1.0;
  const int threads = c.threads < 0 ? auto_threads(c.C, VEC) : c.threads;
  int64_t n_valid = 0;
  for (int64_t r = 0; ce && r < c.B; ++r) n_valid += c.labels[r] != c.ignore_index;
  const float ce_scale = n_valid > 0 ? static_cast<float>((1.0 - c.alpha) / static_cast<double>(n_valid)) : 0.f;
  const float kd = static_cast<float>(kd_weight * c.temperature / static_cast<double>(c.B));
  double kl_sum = 0.0, ce_sum = 0.0;
  bool uniform = true;
  for (int64_t r = 0; r < c.B; ++r) {
    const float* s = c.s + r * c.C;
    const float* t = c.t + r * c.C;
    Stats st;
    uniform = reduce_row<VEC>(s, t, r, c.C, threads, inv_T, ce, st) && uniform;
    const int64_t label = ce ? classify_label(c.labels[r], c.ignore_index, c.C) : kNoLabel;
    const float kl = row_kl(st);
    float rce = 0.f;
    if (label == kBadLabel) rce = NAN;
    if (label >= 0) rce = row_ce(st, s[label]);
    kl_sum += static_cast<double>(kl);
    ce_sum += static_cast<double>(rce);
    if (c.stats) {
      const float v[8] = {st.ms, st.mt, st.zs, st.zt, st.w, st.zr, kl, rce};
      std::memcpy(c.stats + r * 8, v, sizeof(v));
    }
    const RowFinal<float> f =
        make_final(st, inv_T, ce, static_cast<float>(c.grad_output), kd, ce_scale, label);
    const int64_t n = grad_threads(c.C, VEC);
    float* gs = c.gs ? c.gs + r * c.C : nullptr;
    float* gt = c.gt ? c.gt + r * c.C : nullptr;
    for (int64_t tid = 0; tid < n; ++tid) write_grads_row<float, float, VEC>(s, t, gs, gt, split_row<VEC>(r, c.C), f, tid, n);
  }
  const double T = c.temperature;
  *loss = kd_weight * T * T / static_cast<double>(c.B) * kl_sum;
  if (ce && n_valid > 0) *loss += (1.0 - c.alpha) * ce_sum / static_cast<double>(n_valid);
  return uniform ? 0 : 2;
}

}  // namespace

// Returns 0, 1 for bad arguments, 2 when a butterfly left its lanes unequal.
// vec: the kernel's pack width (4 for fp32, 8 for fp16/bf16, 1 for the
// unaligned fallback); s and t must be 16-byte aligned, rows contiguous.
extern "C" int kd_harness_run(
    const float* s, const float* t, int64_t B, int64_t C, const int64_t* labels, int64_t ignore_index,
    double temperature, double alpha, double grad_output, int threads, int vec, float* gs, float* gt, float* stats,
    double* loss) {
  if (B < 1 || C < 1 || threads > 1024 || (threads > 0 && threads % kWarp != 0)) return 1;
  const Call c{s, t, B, C, labels, ignore_index, temperature, alpha, grad_output, threads, gs, gt, stats};
  switch (vec) {
    case 1:
      return run<1>(c, loss);
    case 4:
      return run<4>(c, loss);
    case 8:
      return run<8>(c, loss);
    default:
      return 1;
  }
}
