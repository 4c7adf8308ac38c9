// The CPU kernels of one instruction set, and the choice between them. The including file
// (xent_rows_default.cpp, xent_rows_x86_avx2.cpp, xent_rows_x86_avx512.cpp, xent_rows_x86_avx512_bf16.cpp;
// see xent_cpu.h) defines
// CPU_CAPABILITY (the inline namespace that ATen's Vectorized lives in, so each copy is distinct) and
// CPU_CAPABILITY_<ISA>, and turns the instruction set on, before including this file. The parts:
//   xent_vec.h          vector math: block loads and stores in the accumulation type, vector exp
//   xent_scratch.h      the per-thread scratch memory
//   xent_row_kernel.h   RowKernel: one row at a time, vectorised along the classes
//   xent_few_classes.h  SmallClassKernel: a vector of rows at a time, for a handful of classes
//   xent_position_kernel.h  PositionKernel: K-dimensional (N, C, S) input, vectorised along positions
//   xent_targets.h      the pass over class targets before the kernel (range check, denominator)
//   this file           dispatch on dtype, target kind, softcap and gradient
#pragma once

#include <cstdint>

#include "cpu/xent_cpu.h"
#include "cpu/xent_few_classes.h"
#include "cpu/xent_position_kernel.h"
#include "cpu/xent_row_kernel.h"
#include "cpu/xent_targets.h"

namespace torch_xent {
namespace cpu {
namespace CPU_CAPABILITY {

template <typename scalar_t, bool kProb, bool kSoftcap>
void rows_with(const RowsArgs& a, int64_t begin, int64_t end) {
  if (a.grad != nullptr) {
    RowKernel<scalar_t, kProb, kSoftcap, true>(a).run(begin, end);
  } else {
    RowKernel<scalar_t, kProb, kSoftcap, false>(a).run(begin, end);
  }
}

template <typename scalar_t, bool kProb, bool kSoftcap>
void positions_with(const RowsArgs& a, int64_t begin, int64_t end) {
  if (a.grad != nullptr) {
    PositionKernel<scalar_t, kProb, kSoftcap, true>(a).run(begin, end);
  } else {
    PositionKernel<scalar_t, kProb, kSoftcap, false>(a).run(begin, end);
  }
}

template <typename scalar_t>
void rows_for(const RowsArgs& a, int64_t begin, int64_t end) {
  const bool prob = a.target_prob != nullptr;
  const bool cap = a.softcap > 0;
  if (a.positions > 0) {
    if (prob) {
      cap ? positions_with<scalar_t, true, true>(a, begin, end) : positions_with<scalar_t, true, false>(a, begin, end);
    } else {
      cap ? positions_with<scalar_t, false, true>(a, begin, end)
          : positions_with<scalar_t, false, false>(a, begin, end);
    }
    return;
  }
  if (!prob && !cap && a.classes <= kSmallClasses) {
    if (a.grad != nullptr) {
      SmallClassKernel<scalar_t, true>(a).run(begin, end);
    } else {
      SmallClassKernel<scalar_t, false>(a).run(begin, end);
    }
    return;
  }
  if (prob) {
    cap ? rows_with<scalar_t, true, true>(a, begin, end) : rows_with<scalar_t, true, false>(a, begin, end);
  } else {
    cap ? rows_with<scalar_t, false, true>(a, begin, end) : rows_with<scalar_t, false, false>(a, begin, end);
  }
}

void cross_entropy_rows(const RowsArgs& a, int64_t begin, int64_t end) {
#if defined(TORCH_XENT_AVX512_BF16)
  // Only bfloat16 differs from the AVX512 variant (its stores, see xent_vec.h).
  if (a.dtype != DType::kBFloat16) return AVX512::cross_entropy_rows(a, begin, end);
  return rows_for<c10::BFloat16>(a, begin, end);
#else
  switch (a.dtype) {
    case DType::kFloat:
      return rows_for<float>(a, begin, end);
    case DType::kDouble:
      return rows_for<double>(a, begin, end);
    case DType::kBFloat16:
      return rows_for<c10::BFloat16>(a, begin, end);
    case DType::kHalf:
      return rows_for<c10::Half>(a, begin, end);
  }
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace torch_xent

#undef XENT_INLINE
#undef XENT_LAMBDA_INLINE
