// Plain-data interface between the CPU dispatcher (kd_loss_cpu.cpp, compiled
// with baseline flags) and the row kernels, which are compiled once per
// instruction set (DEFAULT, AVX2, AVX512) and picked at run time.
#pragma once

#include <cstdint>

namespace pyramidkd {
namespace cpu {

enum class KdDtype : int { Float = 0, Half = 1, BFloat16 = 2 };

struct KdCpuArgs {
  KdDtype dtype;
  const void* student;     // [B, C], unit stride along C
  const void* teacher;     // [B, C], unit stride along C
  int64_t student_row_stride;  // in elements
  int64_t teacher_row_stride;  // in elements
  const int64_t* labels;   // [B] contiguous, or nullptr
  int64_t ignore_index;
  int64_t C;
  float inv_temperature;
  float kd_grad_scale;     // kd_weight * T / B
  float ce_grad_scale;     // ce_weight / N_valid (0 if N_valid == 0)
  bool use_ce;
  void* grad_student;      // contiguous [B, C] of the logits' dtype, or nullptr
  void* grad_teacher;      // contiguous [B, C] of the logits' dtype, or nullptr
  double* row_kl;          // [B]: sum_c p (log p - log q) of each row
  double* row_ce;          // [B]: cross-entropy of each row (0 if ignored)
};

// Processes rows [begin, end).  Thread-safe for disjoint row ranges.
using KdRowsFn = void (*)(const KdCpuArgs&, int64_t begin, int64_t end);

// One per instruction set; nullptr when that variant was not compiled.
extern const KdRowsFn kd_rows_default;
extern const KdRowsFn kd_rows_avx2;
extern const KdRowsFn kd_rows_avx512;

}  // namespace cpu
}  // namespace pyramidkd
