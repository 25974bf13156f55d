// Row logic of the CUDA kernel of pyramidkd::kd_loss_fwd, shared by
// kd_loss_cuda.cu and the host harness (csrc/harness/kd_row_harness.cpp), so
// that the exact code the GPU runs per thread -- its strided slice of a row,
// the online state, the merge, the gradient formula -- is tested on a CPU.
//
// Per thread the state holds the running maxima of s and t and the sums,
// relative to them,
//     Zs = sum e^v,  Zt = sum e^u,  W = sum e^u (u - v),  Zr = sum e^(s - max s)
// with u = (t - max t)/T and v = (s - max s)/T.  When a maximum grows the
// sums are rescaled; states merge the same way (symmetric, so a butterfly
// leaves every lane with bitwise the same state).
//
// -inf logits (masked classes): a state whose maximum is still -inf (every
// logit seen so far -inf) has zero sums, not "no state".  Differences with a
// -inf maximum go through shifted() / max_shift(), so -inf - -inf never
// makes a NaN; a teacher -inf (p = 0) adds exactly 0, a student -inf under a
// finite teacher gives an infinite loss (as F.kl_div and the CPU kernel).
//
// Plain C++ (no torch headers): compiles under nvcc and g++.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KD_HD __host__ __device__
#define KD_INLINE __forceinline__
#define KD_UNROLL _Pragma("unroll")
#else
#define KD_HD
#define KD_INLINE inline
#define KD_UNROLL
#endif

namespace pyramidkd {
namespace row {

constexpr int kWarp = 32;
constexpr int64_t kNoLabel = -1;   // no cross-entropy for this row (none, or ignore_index)
constexpr int64_t kBadLabel = -2;  // out of [0, C): the row's loss and gradient become NaN

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Device: __expf (ex2.approx of x*log2e; --use_fast_math).  Host: the same
// product rounded to float, then an exact exp2, so the harness sees the same
// argument rounding as the GPU.
KD_HD KD_INLINE float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp2(x * 1.44269504088896341f);
#endif
}
KD_HD KD_INLINE double fast_exp(double x) {
  return ::exp(x);
}
KD_HD KD_INLINE float acc_log(float x) {
  return ::logf(x);
}
KD_HD KD_INLINE double acc_log(double x) {
  return ::log(x);
}

template <typename acc_t>
KD_HD KD_INLINE acc_t neg_inf() {
  return static_cast<acc_t>(-INFINITY);
}

// x - m, where m >= x is a running or row maximum; a -inf logit stays -inf
// even when m is -inf too (instead of -inf - -inf = NaN).
template <typename acc_t>
KD_HD KD_INLINE acc_t shifted(acc_t x, acc_t m) {
  return x == neg_inf<acc_t>() ? x : x - m;
}

// (m - nm) * scale for a maximum m growing to nm >= m: 0 when it does not
// grow (-inf to -inf included), -inf when m was -inf (the sums are then 0).
template <typename acc_t>
KD_HD KD_INLINE acc_t max_shift(acc_t m, acc_t nm, acc_t scale) {
  return m == nm ? acc_t(0) : (m - nm) * scale;
}

template <typename acc_t>
struct RowStats {
  acc_t ms;  // running max of s (raw logits)
  acc_t mt;  // running max of t
  acc_t zs;  // sum exp((s - ms) / T)
  acc_t zt;  // sum exp((t - mt) / T)
  acc_t w;   // sum exp((t - mt) / T) * ((t - mt) - (s - ms)) / T
  acc_t zr;  // sum exp(s - ms)               (cross-entropy only)
};

template <typename acc_t>
KD_HD KD_INLINE RowStats<acc_t> empty_stats() {
  RowStats<acc_t> st;
  st.ms = neg_inf<acc_t>();
  st.mt = neg_inf<acc_t>();
  st.zs = st.zt = st.w = st.zr = acc_t(0);
  return st;
}

// Re-expresses the sums relative to new maxima nms >= ms, nmt >= mt.
template <typename acc_t>
KD_HD KD_INLINE void rescale(RowStats<acc_t>& st, acc_t nms, acc_t nmt, acc_t inv_T, bool ce) {
  if (nms == st.ms && nmt == st.mt) return;
  const acc_t dt = max_shift(st.mt, nmt, inv_T);  // <= 0
  const acc_t ds = max_shift(st.ms, nms, inv_T);  // <= 0
  const acc_t at = fast_exp(dt);
  // Every u moves by dt and every v by ds.  Without teacher mass (zt == 0)
  // there is nothing to move, where zt * (dt - ds) could be 0 * inf.
  st.w = at * (st.w + (st.zt > acc_t(0) ? st.zt * (dt - ds) : acc_t(0)));
  st.zt *= at;
  st.zs *= fast_exp(ds);
  if (ce) st.zr *= fast_exp(max_shift(st.ms, nms, acc_t(1)));
  st.ms = nms;
  st.mt = nmt;
}

// Symmetric: merge(a, b) and merge(b, a) are bitwise equal.  An empty state
// (maxima -inf, sums 0) is the identity: it rescales to zero sums.
template <typename acc_t>
KD_HD KD_INLINE RowStats<acc_t> merge(RowStats<acc_t> a, RowStats<acc_t> b, acc_t inv_T, bool ce) {
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

// Adds N (s, t) pairs to the state: one rescale per chunk.
template <typename acc_t, int N>
KD_HD KD_INLINE void absorb(
    RowStats<acc_t>& st, const acc_t (&xs)[N], const acc_t (&xt)[N], acc_t inv_T, bool ce) {
  acc_t cms = st.ms, cmt = st.mt;
KD_UNROLL
  for (int i = 0; i < N; ++i) {
    cms = xs[i] > cms ? xs[i] : cms;
    cmt = xt[i] > cmt ? xt[i] : cmt;
  }
  rescale(st, cms, cmt, inv_T, ce);
KD_UNROLL
  for (int i = 0; i < N; ++i) {
    const acc_t ds = shifted(xs[i], st.ms);
    const acc_t v = ds * inv_T;
    const acc_t u = shifted(xt[i], st.mt) * inv_T;
    const acc_t eu = fast_exp(u);
    st.zs += fast_exp(v);
    st.zt += eu;
    st.w += eu > acc_t(0) ? eu * (u - v) : acc_t(0);  // teacher -inf (p = 0): no 0 * -inf
    if (ce) st.zr += fast_exp(ds);
  }
}

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
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
KD_HD KD_INLINE RowSplit split_row(int64_t row, int64_t C) {
  RowSplit r;
  if (VEC == 1) {
    r.head = 0;
    r.nvec = C;
    r.tail_begin = C;
    r.n_scalar = 0;
    return r;
  }
  const int64_t mis = (row * C) % VEC;  // == misalignment of the s and t rows too
  int64_t head = (VEC - mis) % VEC;
  head = head < C ? head : C;
  r.head = head;
  r.nvec = (C - head) / VEC;
  r.tail_begin = head + r.nvec * VEC;
  r.n_scalar = head + (C - r.tail_begin);
  return r;
}

KD_HD KD_INLINE int64_t scalar_index(const RowSplit& r, int64_t k) {
  return k < r.head ? k : r.tail_begin + (k - r.head);
}

// One thread's share of a row: packs tid, tid + n, ... then the scalar head
// and tail elements tid, tid + n, ... (in that order).
template <typename scalar_t, typename acc_t, int VEC>
KD_HD KD_INLINE RowStats<acc_t> accumulate_row(
    const scalar_t* s, const scalar_t* t, const RowSplit& sp, int64_t tid, int64_t nthreads, acc_t inv_T, bool ce) {
  RowStats<acc_t> st = empty_stats<acc_t>();
  for (int64_t j = tid; j < sp.nvec; j += nthreads) {
    const int64_t c = sp.head + j * VEC;
    const Pack<scalar_t, VEC> ps = *reinterpret_cast<const Pack<scalar_t, VEC>*>(s + c);
    const Pack<scalar_t, VEC> pt = *reinterpret_cast<const Pack<scalar_t, VEC>*>(t + c);
    acc_t xs[VEC], xt[VEC];
KD_UNROLL
    for (int i = 0; i < VEC; ++i) {
      xs[i] = static_cast<acc_t>(ps.v[i]);
      xt[i] = static_cast<acc_t>(pt.v[i]);
    }
    absorb<acc_t, VEC>(st, xs, xt, inv_T, ce);
  }
  for (int64_t k = tid; k < sp.n_scalar; k += nthreads) {
    const int64_t c = scalar_index(sp, k);
    const acc_t xs[1] = {static_cast<acc_t>(s[c])};
    const acc_t xt[1] = {static_cast<acc_t>(t[c])};
    absorb<acc_t, 1>(st, xs, xt, inv_T, ce);
  }
  return st;
}

// The row's KL term sum_c p (log p - log q) from its merged state.
template <typename acc_t>
KD_HD KD_INLINE acc_t row_kl(const RowStats<acc_t>& st) {
  return st.w / st.zt + acc_log(st.zs) - acc_log(st.zt);
}

// The row's cross-entropy -log softmax(s)[label], from s[label].
template <typename acc_t>
KD_HD KD_INLINE acc_t row_ce(const RowStats<acc_t>& st, acc_t s_label) {
  return acc_log(st.zr) - shifted(s_label, st.ms);
}

// kNoLabel for ignore_index, kBadLabel outside [0, C), else the label.
KD_HD KD_INLINE int64_t classify_label(int64_t l, int64_t ignore_index, int64_t C) {
  if (l == ignore_index) return kNoLabel;
  return (l >= 0 && l < C) ? l : kBadLabel;
}

// Per-row coefficients of the gradient, grad_output folded in.
template <typename acc_t>
struct RowFinal {
  acc_t ms, mt;
  acc_t inv_T;
  acc_t c_ev;   // g kd / Zs
  acc_t c_eu;   // g kd / Zt
  acc_t c_er;   // g ce_scale / Zr
  acc_t w_over_zt;
  acc_t ce_onehot;  // g ce_scale, subtracted at the label
  int64_t label;    // kNoLabel when none
  bool ce;
  bool unit_T;
};

// g = grad_output, kd = kd_weight T / B, ce_scale = ce_weight / N_valid.
template <typename acc_t>
KD_HD KD_INLINE RowFinal<acc_t> make_final(
    const RowStats<acc_t>& st, acc_t inv_T, bool ce, acc_t g, acc_t kd, acc_t ce_scale, int64_t label) {
  RowFinal<acc_t> f;
  f.ms = st.ms;
  f.mt = st.mt;
  f.inv_T = inv_T;
  f.unit_T = inv_T == acc_t(1);
  f.ce = ce && label != kNoLabel;
  f.c_ev = g * kd / st.zs;
  f.c_eu = g * kd / st.zt;
  f.w_over_zt = st.w / st.zt;
  f.c_er = f.ce ? g * ce_scale / st.zr : acc_t(0);
  f.ce_onehot = f.ce ? g * ce_scale : acc_t(0);
  f.label = label;
  if (label == kBadLabel) f.c_ev = f.c_eu = static_cast<acc_t>(NAN);  // a NaN row, not a dead context
  return f;
}

template <typename acc_t>
KD_HD KD_INLINE void grad_elem(const RowFinal<acc_t>& f, acc_t xs, acc_t xt, int64_t c, acc_t& gs, acc_t& gt) {
  const acc_t ds = shifted(xs, f.ms);
  const acc_t v = ds * f.inv_T;
  const acc_t u = shifted(xt, f.mt) * f.inv_T;
  const acc_t ev = fast_exp(v);
  const acc_t eu = fast_exp(u);
  gs = f.c_ev * ev - f.c_eu * eu;
  if (f.ce) {
    gs += f.c_er * (f.unit_T ? ev : fast_exp(ds));
    if (c == f.label) gs -= f.ce_onehot;
  }
  gt = eu > acc_t(0) ? f.c_eu * eu * ((u - v) - f.w_over_zt) : acc_t(0);
}

// Writes one thread's share of a row's gradients (same slices as
// accumulate_row); gs or gt may be nullptr.
template <typename scalar_t, typename acc_t, int VEC>
KD_HD KD_INLINE void write_grads_row(
    const scalar_t* s, const scalar_t* t, scalar_t* gs, scalar_t* gt, const RowSplit& sp,
    const RowFinal<acc_t>& f, int64_t tid, int64_t nthreads) {
  for (int64_t j = tid; j < sp.nvec; j += nthreads) {
    const int64_t c = sp.head + j * VEC;
    const Pack<scalar_t, VEC> ps = *reinterpret_cast<const Pack<scalar_t, VEC>*>(s + c);
    const Pack<scalar_t, VEC> pt = *reinterpret_cast<const Pack<scalar_t, VEC>*>(t + c);
    Pack<scalar_t, VEC> os, ot;
KD_UNROLL
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

}  // namespace row
}  // namespace pyramidkd
