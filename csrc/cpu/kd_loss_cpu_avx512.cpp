// AVX512 (F/BW/VL/DQ) build of the row kernel (see kd_loss_cpu_kernel.h),
// used only when the CPU supports it.
#include "kd_loss_cpu.h"

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq")
// g++ does not update the ISA feature macros after the pragma; the headers
// (sleef.h, at::vec) test them, so define the ones the pragma enabled.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define PYRAMIDKD_ROWS_FN kd_rows_avx512
#include "kd_loss_cpu_kernel.h"
#else
namespace pyramidkd::cpu {
extern const KdRowsFn kd_rows_avx512 = nullptr;
}
#endif
