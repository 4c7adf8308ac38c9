// The pass over class targets that runs before the kernel (compiled once per instruction set, see
// xent_rows.h): for one block of targets, the first index outside [0, C) that is not ignore_index,
// and the mean's denominator over the block, the count of the targets that count or the sum of
// their class weights. For K-dimensional input with few classes this pass is a sizeable part of the
// work (8 bytes of target against 2 C bytes of bfloat16 logits a position), so it is vectorised:
// AVX-512 compares 8 targets at once and gathers their weights; the other variants run a loop without
// branches (ignored targets are scattered: a branch on them is mispredicted) that the compiler may
// vectorise.
//
// The weights are summed in double in 8 interleaved partial sums (target i of the block into sum
// i mod 8), combined in one fixed order, in every variant: the same denominator, bit for bit,
// whatever the instruction set or the thread count.
#pragma once

#include <cstdint>

#include "cpu/xent_cpu.h"

namespace torch_xent {
namespace cpu {
namespace CPU_CAPABILITY {

inline double combine8(const double* p) { return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7])); }

// The first bad index of y[0, n), which the caller knows to hold one.
inline int64_t first_bad_target(const int64_t* y, int64_t n, int64_t classes, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i) {
    if (y[i] != ignore_index && (y[i] < 0 || y[i] >= classes)) return i;
  }
  return -1;
}

template <typename w_t>
double class_targets_block(const int64_t* y, int64_t n, int64_t classes, int64_t ignore_index, const w_t* weight,
                           int64_t* first_bad) {
  const uint64_t limit = static_cast<uint64_t>(classes);
  uint64_t bad_bits = 0;
  double total = 0;                            // the count, without weights
  alignas(64) double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // the weights' partial sums
  int64_t i = 0;
  // Locals only in the loops (y could alias anything the compiler sees through a pointer).
#if defined(CPU_CAPABILITY_AVX512)
  {
    const __m512i vignore = _mm512_set1_epi64(ignore_index);
    const __m512i vlimit = _mm512_set1_epi64(static_cast<int64_t>(limit));
    __mmask8 bad = 0;
    if (weight == nullptr) {
      __m512i count = _mm512_setzero_si512();
      const __m512i one = _mm512_set1_epi64(1);
      for (; i + 8 <= n; i += 8) {
        const __m512i t = _mm512_loadu_si512(y + i);
        const __mmask8 counted = _mm512_cmpneq_epi64_mask(t, vignore);
        bad |= _mm512_mask_cmpge_epu64_mask(counted, t, vlimit);
        count = _mm512_mask_add_epi64(count, counted, count, one);
      }
      total = static_cast<double>(_mm512_reduce_add_epi64(count));
    } else {
      __m512d sum = _mm512_setzero_pd();
      for (; i + 8 <= n; i += 8) {
        const __m512i t = _mm512_loadu_si512(y + i);
        const __mmask8 counted = _mm512_cmpneq_epi64_mask(t, vignore);
        const __mmask8 out = _mm512_mask_cmpge_epu64_mask(counted, t, vlimit);
        bad |= out;
        const __mmask8 take = counted & static_cast<__mmask8>(~out);  // no load outside the weights
        __m512d w;
        if constexpr (sizeof(w_t) == sizeof(double)) {
          w = _mm512_mask_i64gather_pd(_mm512_setzero_pd(), take, t, weight, 8);
        } else {
          w = _mm512_cvtps_pd(_mm512_mask_i64gather_ps(_mm256_setzero_ps(), take, t, weight, 4));
        }
        sum = _mm512_add_pd(sum, w);
      }
      _mm512_store_pd(part, sum);  // lane k: the targets i = k (mod 8) so far
    }
    bad_bits = bad;
  }
#endif
  if (weight == nullptr) {
    int64_t count = 0;
    for (; i < n; ++i) {
      const int64_t t = y[i];
      const uint64_t counted = t != ignore_index ? 1 : 0;
      count += static_cast<int64_t>(counted);
      bad_bits |= counted & (static_cast<uint64_t>(t) >= limit ? 1 : 0);
    }
    total += static_cast<double>(count);  // counts below 2^53: exact, in any order
  } else {
    // The rest in the same 8 partial sums (i is a multiple of 8 here). A target that does not count,
    // or is out of range, adds 0 and reads weight[0].
    for (; i < n; ++i) {
      const int64_t t = y[i];
      const bool counted = t != ignore_index;
      const bool out = static_cast<uint64_t>(t) >= limit;
      bad_bits |= (counted && out) ? 1 : 0;
      const double w = static_cast<double>(weight[counted && !out ? t : 0]);
      part[i % 8] += counted && !out ? w : 0.0;
    }
    total = combine8(part);
  }
  *first_bad = bad_bits != 0 ? first_bad_target(y, n, classes, ignore_index) : -1;
  return total;
}

double class_targets(const int64_t* y, int64_t n, int64_t classes, int64_t ignore_index, const void* weight,
                     DType weight_dtype, int64_t* first_bad) {
  if (weight == nullptr) {
    return class_targets_block<float>(y, n, classes, ignore_index, nullptr, first_bad);
  }
  if (weight_dtype == DType::kDouble) {
    return class_targets_block(y, n, classes, ignore_index, static_cast<const double*>(weight), first_bad);
  }
  return class_targets_block(y, n, classes, ignore_index, static_cast<const float*>(weight), first_bad);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace torch_xent
