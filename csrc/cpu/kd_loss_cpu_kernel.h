// Row kernel of the fused distillation loss, written once against at::vec and
// compiled per instruction set: include this file after defining
// CPU_CAPABILITY (DEFAULT / AVX2 / AVX512), the matching CPU_CAPABILITY_*
// macro and PYRAMIDKD_ROWS_FN (the name of the exported function pointer).
//
// Per row, in base-2 units (u = (t - max t) log2(e) / T, v likewise for s):
//   pass 1: max s, max t                                  (no exp)
//   pass 2: Zs = sum 2^v, Zt = sum 2^u, A = sum 2^u (u - v),
//           Zr = sum 2^((s - max s) log2 e) for the cross-entropy
//           (2-3 exp2 / element).  2^u (and the CE term) are kept in a
//           row-sized scratch buffer and 2^v in the gradient row, so the
//           gradient pass needs no exp.
//   KL_row = ln2 A / Zt + ln Zs - ln Zt
//   pass 3: grad_s = kd (2^v / Zs - 2^u / Zt) + ce (2^r / Zr - onehot)
//           grad_t = kd 2^u / Zt ln2 ((u - v) - A / Zt)
// Working in base 2 lets exp2_clamped() below replace the general exp: one
// scale, a rounding, a degree-5 polynomial and an integer add.
// Reductions use per-lane accumulators combined in a fixed order, so results
// do not depend on the thread count.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kd_loss_cpu.h"

namespace pyramidkd {
namespace cpu {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// Horizontal sum / max by shuffle trees (at::vec): a few instructions
// instead of a kW-long scalar chain, which matters for short rows (C ~ 100).
inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& x, const Vec& y) { return x + y; }, v);
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>(
      [](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); }, v);
}

// Partial (n < kW lanes) loads and stores for row tails.  at::vec's
// loadu(p, n) / store(p, n) go through a stack buffer and memcpy; with AVX2 /
// AVX512 masked moves are used instead (rows are short, tails are per row).
#if defined(CPU_CAPABILITY_AVX512)
inline __mmask16 tail_mask(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}
inline Vec load_part(const float* p, int64_t n) {
  return Vec(_mm512_maskz_loadu_ps(tail_mask(n), p));
}
inline void store_part(const Vec& v, float* p, int64_t n) {
  _mm512_mask_storeu_ps(p, tail_mask(n), v);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256i tail_mask(int64_t n) {
  alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - n));
}
inline Vec load_part(const float* p, int64_t n) {
  return Vec(_mm256_maskload_ps(p, tail_mask(n)));
}
inline void store_part(const Vec& v, float* p, int64_t n) {
  _mm256_maskstore_ps(p, tail_mask(n), v);
}
#else
inline Vec load_part(const float* p, int64_t n) {
  return Vec::loadu(p, n);
}
inline void store_part(const Vec& v, float* p, int64_t n) {
  v.store(p, n);
}
#endif

inline Vec load_n(const float* p, int64_t n) {
  return n == kW ? Vec::loadu(p) : load_part(p, n);
}
inline void store_n(const Vec& v, float* p, int64_t n) {
  if (n == kW) {
    v.store(p);
  } else {
    store_part(v, p, n);
  }
}

// Loads `n` (< kW) elements and fills the other lanes with `fill`.
inline Vec load_tail(const float* p, int64_t n, const Vec& fill) {
  return Vec::set(fill, load_part(p, n), n);
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

constexpr float kExp2Lowest = -100.f;  // lower clamp of exp2 arguments

// Multiplies p by 2^n, where n is held in the low mantissa bits of r (see
// exp2_clamped): shifted into the exponent field, they add n to p's exponent.
#if defined(CPU_CAPABILITY_AVX512)
inline Vec scale_by_pow2(const Vec& p, const Vec& r) {
  const __m512i e = _mm512_slli_epi32(_mm512_castps_si512(r), 23);
  return Vec(_mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e)));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec scale_by_pow2(const Vec& p, const Vec& r) {
  const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(r), 23);
  return Vec(_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e)));
}
#else
inline Vec scale_by_pow2(const Vec& p, const Vec& r) {
  alignas(64) float pv[kW], rv[kW];
  p.store(pv);
  r.store(rv);
  for (int64_t i = 0; i < kW; ++i) {
    uint32_t pb, rb;
    std::memcpy(&pb, pv + i, 4);
    std::memcpy(&rb, rv + i, 4);
    pb += rb << 23;
    std::memcpy(pv + i, &pb, 4);
  }
  return Vec::loadu(pv);
}
#endif

// 2^x for x in [kExp2Lowest, 0] (or NaN): arguments are shifted by the row
// maximum and clamped by the caller (exp2_nonpos below, or pass 2 for u,
// which needs the clamped value itself).  The clamp at -100 costs nothing
// measurable (2^-100 next to the row's largest term, 1) and keeps every result
// a normal float (no denormal slow paths).  n = round(x) via the 1.5 * 2^23
// shifter, 2^(x - n) by a degree-5 minimax polynomial on [-1/2, 1/2] with
// c0 = 1, so that 2^0 (a row's largest term) is exact (relative error 1.9e-7
// in float arithmetic, ~2 ulp), then n added to the exponent bits.  About 10
// instructions, against ~17 for at::vec's exp_u20; the same algorithm in
// every ISA build.
inline Vec exp2_clamped(const Vec& xc) {
  const Vec shifter(12582912.f);  // 1.5 * 2^23
  const Vec r = xc + shifter;  // n in the low mantissa bits
  const Vec f = xc - (r - shifter);
  Vec p = at::vec::fmadd(Vec(0.00132647273f), f, Vec(0.00967151299f));
  p = at::vec::fmadd(p, f, Vec(0.0555073358f));
  p = at::vec::fmadd(p, f, Vec(0.240222424f));
  p = at::vec::fmadd(p, f, Vec(0.693147004f));
  p = at::vec::fmadd(p, f, Vec(1.f));
  return scale_by_pow2(p, r);
}

// Clamps x <= 0 at kExp2Lowest (a NaN in x propagates on x86) for exp2_clamped.
inline Vec clamp_exp2_arg(const Vec& x) {
  return at::vec::clamp_min(x, Vec(kExp2Lowest));
}

inline Vec exp2_nonpos(const Vec& x) {
  return exp2_clamped(clamp_exp2_arg(x));
}

struct RowOut {
  double kl;
  double ce;
};

// s, t: float rows of length C.  gs / gt: float rows (may be nullptr).
// eu / er: scratch rows of length C (er only used with use_ce and T != 1).
inline RowOut kd_row_f32(
    const float* s,
    const float* t,
    int64_t C,
    int64_t label,  // -1 when this row has no (valid) label
    const KdCpuArgs& a,
    float* gs,
    float* gt,
    float* eu_buf,
    float* er_buf) {
  const bool need_grad = gs != nullptr || gt != nullptr;
  const bool ce = a.use_ce;
  const float inv_T = a.inv_temperature;
  const bool unit_T = inv_T == 1.0f;  // then e^r == e^v
  const int64_t C_vec = C - (C % kW);
  const int64_t tail = C - C_vec;

  // pass 1: maxima, by the bare max instruction (clamp_min): at::vec::maximum
  // adds three instructions per vector to propagate NaN, which pass 2 does
  // anyway (a NaN logit makes its v or u, and so the sums, NaN).
  const float neg_inf = -std::numeric_limits<float>::infinity();
  Vec vms(neg_inf), vmt(neg_inf);
  for (int64_t i = 0; i < C_vec; i += kW) {
    vms = at::vec::clamp_min(Vec::loadu(s + i), vms);
    vmt = at::vec::clamp_min(Vec::loadu(t + i), vmt);
  }
  if (tail) {
    vms = at::vec::clamp_min(load_tail(s + C_vec, tail, Vec(neg_inf)), vms);
    vmt = at::vec::clamp_min(load_tail(t + C_vec, tail, Vec(neg_inf)), vmt);
  }
  const float ms = hmax(vms);
  const float mt = hmax(vmt);

  // pass 2: sums.  v, u (and the CE exponent r) are in base-2 units.
  const float scale2 = inv_T * kLog2e;
  const Vec v_ms(ms), v_mt(mt), v_scale2(scale2), v_log2e(kLog2e), zero(0.f);
  Vec zs(0.f), zt(0.f), acc_a(0.f), zr(0.f);
  float* ev_buf = gs;  // 2^v is parked in the student-gradient row
  auto body = [&](const Vec& xs, const Vec& xt, int64_t i, int64_t n) {
    const Vec ds = xs - v_ms;
    const Vec v = ds * v_scale2;
    // u is clamped once, for its exp2 and for u - v, so that a teacher logit
    // of -inf (a masked class, p = 0) adds 2^-100 * finite to A, not -inf.
    const Vec u = clamp_exp2_arg((xt - v_mt) * v_scale2);
    Vec ev = exp2_nonpos(v);
    Vec eu = exp2_clamped(u);
    Vec d = u - v;
    Vec er;
    if (ce) er = unit_T ? ev : exp2_nonpos(ds * v_log2e);
    if (n != kW) {  // tail: drop the padded lanes
      ev = Vec::set(zero, ev, n);
      eu = Vec::set(zero, eu, n);
      d = Vec::set(zero, d, n);
      if (ce) er = Vec::set(zero, er, n);
    }
    zs = zs + ev;
    zt = zt + eu;
    acc_a = at::vec::fmadd(eu, d, acc_a);
    if (ce) zr = zr + er;
    if (need_grad) {
      store_n(eu, eu_buf + i, n);
      if (ev_buf) store_n(ev, ev_buf + i, n);
      if (ce && !unit_T && gs) store_n(er, er_buf + i, n);
    }
  };
  for (int64_t i = 0; i < C_vec; i += kW) {
    body(Vec::loadu(s + i), Vec::loadu(t + i), i, kW);
  }
  if (tail) {
    body(load_tail(s + C_vec, tail, v_ms), load_tail(t + C_vec, tail, v_mt), C_vec, tail);
  }
  const float Zs = hsum(zs);
  const float Zt = hsum(zt);
  const float a_over_zt = hsum(acc_a) / Zt;  // base-2 units
  RowOut out;
  out.kl = static_cast<double>(kLn2) * static_cast<double>(a_over_zt) +
      static_cast<double>(std::log(Zs / Zt));
  out.ce = 0.0;
  float Zr = 1.f;
  if (ce) {
    Zr = hsum(zr);
    if (label >= 0) {
      out.ce = static_cast<double>(std::log(Zr)) - static_cast<double>(s[label] - ms);
    }
  }
  if (!need_grad) return out;

  // pass 3: gradients
  const float kd = a.kd_grad_scale;
  const Vec c_ev(kd / Zs), c_eu(kd / Zt);
  // rows with an ignored label get no cross-entropy gradient
  const Vec c_er(ce && label >= 0 ? a.ce_grad_scale / Zr : 0.f);
  const Vec c_gt(kd / Zt * kLn2), v_a_over_zt(a_over_zt);
  const float* er_src = unit_T ? ev_buf : er_buf;
  auto grad_body = [&](int64_t i, int64_t n) {
    const Vec eu = load_n(eu_buf + i, n);
    if (gs) {
      const Vec ev = load_n(ev_buf + i, n);
      Vec g = ev * c_ev - eu * c_eu;  // exactly 0 where s = t
      if (ce) g = at::vec::fmadd(load_n(er_src + i, n), c_er, g);
      store_n(g, gs + i, n);
    }
    if (gt) {
      const Vec xs = load_n(s + i, n), xt = load_n(t + i, n);
      const Vec u = clamp_exp2_arg((xt - v_mt) * v_scale2);
      const Vec d = u - (xs - v_ms) * v_scale2;  // as in pass 2
      const Vec g = eu * c_gt * (d - v_a_over_zt);
      store_n(g, gt + i, n);
    }
  };
  for (int64_t i = 0; i < C_vec; i += kW) grad_body(i, kW);
  if (tail) grad_body(C_vec, tail);
  if (gs && ce && label >= 0) gs[label] -= a.ce_grad_scale;
  return out;
}

// Converts n elements of a 16-bit float row to float.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  using VecT = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + VecT::size() <= n; i += VecT::size()) {
    auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(src + i));
    lo.store(dst + i);
    hi.store(dst + i + kW);
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  using VecT = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + VecT::size() <= n; i += VecT::size()) {
    at::vec::convert_from_float<T>(Vec::loadu(src + i), Vec::loadu(src + i + kW))
        .store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

inline int64_t row_label(const KdCpuArgs& a, int64_t r) {
  if (!a.use_ce || a.labels == nullptr) return -1;
  const int64_t l = a.labels[r];
  return l == a.ignore_index ? -1 : l;  // range checked by the dispatcher
}

template <typename T>
void kd_rows_impl(const KdCpuArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.C;
  constexpr bool reduced = !std::is_same_v<T, float>;
  const bool need_grad = a.grad_student != nullptr || a.grad_teacher != nullptr;
  // scratch: e^u, e^r, and for 16-bit inputs float copies of s, t, gs, gt.
  const int64_t n_scratch = (need_grad ? 2 : 0) + (reduced ? 4 : 0);
  // (plain new[]: keeps std:: template instantiations out of the ISA-specific
  // translation units.)
  float* scratch = n_scratch ? new float[n_scratch * C] : nullptr;
  float* eu_buf = need_grad ? scratch : nullptr;
  float* er_buf = need_grad ? scratch + C : nullptr;
  float* fbase = scratch + (need_grad ? 2 * C : 0);
  const T* S = static_cast<const T*>(a.student);
  const T* Tt = static_cast<const T*>(a.teacher);
  T* GS = static_cast<T*>(a.grad_student);
  T* GT = static_cast<T*>(a.grad_teacher);
  for (int64_t r = begin; r < end; ++r) {
    const T* s = S + r * a.student_row_stride;
    const T* t = Tt + r * a.teacher_row_stride;
    T* gs = GS ? GS + r * C : nullptr;
    T* gt = GT ? GT + r * C : nullptr;
    RowOut o;
    if constexpr (!reduced) {
      o = kd_row_f32(s, t, C, row_label(a, r), a, gs, gt, eu_buf, er_buf);
    } else {
      float* fs = fbase;
      float* ft = fbase + C;
      float* fgs = gs ? fbase + 2 * C : nullptr;
      float* fgt = gt ? fbase + 3 * C : nullptr;
      to_float(s, fs, C);
      to_float(t, ft, C);
      o = kd_row_f32(fs, ft, C, row_label(a, r), a, fgs, fgt, eu_buf, er_buf);
      if (gs) from_float(fgs, gs, C);
      if (gt) from_float(fgt, gt, C);
    }
    a.row_kl[r] = o.kl;
    a.row_ce[r] = o.ce;
  }
  delete[] scratch;
}

inline void kd_rows(const KdCpuArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case KdDtype::Float:
      kd_rows_impl<float>(a, begin, end);
      break;
    case KdDtype::Half:
      kd_rows_impl<c10::Half>(a, begin, end);
      break;
    case KdDtype::BFloat16:
      kd_rows_impl<c10::BFloat16>(a, begin, end);
      break;
  }
}

}  // namespace CPU_CAPABILITY

extern const KdRowsFn PYRAMIDKD_ROWS_FN = &CPU_CAPABILITY::kd_rows;

}  // namespace cpu
}  // namespace pyramidkd
