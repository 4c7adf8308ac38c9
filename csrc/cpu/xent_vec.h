// Vector math of the CPU kernels (compiled once per instruction set, see xent_rows.h): the loads and
// stores of one block of logits in the accumulation type, an exp for the kernels' arguments, and
// lane-wise helpers. Plain formulas are in ../xent_math.h.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "xent_math.h"

namespace torch_xent {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// The hot loops are lambdas handed to for_blocks and small load/store helpers: g++ does not always
// inline them (it did not for the bfloat16 forward without gradient, which then made a call per
// vector with every live vector spilled around it), so they are forced inline.
#if defined(__GNUC__)
#define XENT_INLINE inline __attribute__((always_inline))
#define XENT_LAMBDA_INLINE __attribute__((always_inline))
#else
#define XENT_INLINE inline
#define XENT_LAMBDA_INLINE
#endif

// One block is the elements of one Vectorized<scalar_t>, held as kVecs vectors of acc_t.
template <typename scalar_t>
struct Block {
  using acc_t = scalar_t;
  using Vec = Vectorized<acc_t>;
  static constexpr int kVecs = 1;
  static constexpr int64_t kSize = Vec::size();
  static XENT_INLINE void load(const scalar_t* p, Vec* v) { v[0] = Vec::loadu(p); }
  static XENT_INLINE void store(scalar_t* p, const Vec* v) { v[0].store(p); }
};

// bfloat16 and float16 are computed in float32: one vector of them is two float vectors.
template <typename half_t>
struct HalfBlock {
  using acc_t = float;
  using Vec = Vectorized<float>;
  using HVec = Vectorized<half_t>;
  static constexpr int kVecs = 2;
  static constexpr int64_t kSize = HVec::size();
  static_assert(HVec::size() == 2 * Vec::size(), "one half-precision vector converts to two float vectors");
  static XENT_INLINE void load(const half_t* p, Vec* v) {
    std::tie(v[0], v[1]) = at::vec::convert_to_float<half_t>(HVec::loadu(p));
  }
  static XENT_INLINE void store(half_t* p, const Vec* v) { at::vec::convert_from_float<half_t>(v[0], v[1]).store(p); }
};
template <>
struct Block<c10::BFloat16> : HalfBlock<c10::BFloat16> {};
template <>
struct Block<c10::Half> : HalfBlock<c10::Half> {};

// exp for the kernel's arguments, which are <= 0 up to rounding (z - max, z - lse) or -inf, and give
// exactly 0 for -inf. ATen's Vectorized::exp_u20 is not inlined by g++ (a call per vector, with
// every live vector spilled around it), hence these always-inlined versions for the x86 variants:
// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2], exp(r) by its Taylor
// polynomial of degree 6 (relative error below 1e-7). A NaN argument stays NaN.
template <typename Vec>
inline Vec vexp(const Vec& x) {
  return x.exp();
}
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define TORCH_XENT_ALWAYS_INLINE inline __attribute__((always_inline))
#if defined(CPU_CAPABILITY_AVX512)
using FloatReg = __m512;
#define XENT_PS(op) _mm512_##op##_ps
#else
using FloatReg = __m256;
#define XENT_PS(op) _mm256_##op##_ps
#endif
TORCH_XENT_ALWAYS_INLINE FloatReg exp_poly_reduce(FloatReg x, FloatReg* n_out) {
  // max(c, x) returns x when x is NaN; exp(-110) is below float's smallest denormal.
  x = XENT_PS(max)(XENT_PS(set1)(-110.0f), x);
  x = XENT_PS(min)(XENT_PS(set1)(88.7f), x);
#if defined(CPU_CAPABILITY_AVX512)
  const FloatReg n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const FloatReg n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  // r = x - n ln2 with ln2 split in two parts, so that n * ln2_hi is exact.
  FloatReg r = XENT_PS(fnmadd)(n, XENT_PS(set1)(0.693359375f), x);
  r = XENT_PS(fnmadd)(n, XENT_PS(set1)(-2.12194440e-4f), r);
  FloatReg p = XENT_PS(set1)(1.0f / 720.0f);
  p = XENT_PS(fmadd)(p, r, XENT_PS(set1)(1.0f / 120.0f));
  p = XENT_PS(fmadd)(p, r, XENT_PS(set1)(1.0f / 24.0f));
  p = XENT_PS(fmadd)(p, r, XENT_PS(set1)(1.0f / 6.0f));
  p = XENT_PS(fmadd)(p, r, XENT_PS(set1)(0.5f));
  p = XENT_PS(fmadd)(p, r, XENT_PS(set1)(1.0f));
  p = XENT_PS(fmadd)(p, r, XENT_PS(set1)(1.0f));
  *n_out = n;
  return p;
}
template <>
TORCH_XENT_ALWAYS_INLINE Vectorized<float> vexp(const Vectorized<float>& v) {
  FloatReg n;
  const FloatReg p = exp_poly_reduce(v, &n);
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);  // p * 2^n, rounding to 0 below the denormals
#else
  // 2^n built in the exponent field; n < -126 (x below about -87.3) is flushed to 0, as is -inf.
  const __m256 too_small = _mm256_cmp_ps(n, _mm256_set1_ps(-126.0f), _CMP_LT_OQ);
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(too_small, r);
#endif
}
#undef XENT_PS
#undef TORCH_XENT_ALWAYS_INLINE
#endif

// q * z lane by lane, with q == 0 counting as 0 even where z = -inf: the vector form of
// weighted_logit in xent_math.h (brought in here, so that both forms are found by that name).
using torch_xent::weighted_logit;
template <typename acc_t>
XENT_INLINE Vectorized<acc_t> weighted_logit(const Vectorized<acc_t>& q, const Vectorized<acc_t>& z) {
  using Vec = Vectorized<acc_t>;
  return Vec::blendv(q * z, Vec(acc_t(0)), q == Vec(acc_t(0)));
}

// The max and the sum of the lanes of count vectors.
template <typename acc_t>
acc_t hmax(const Vectorized<acc_t>* v, int count) {
  using Vec = Vectorized<acc_t>;
  Vec x = v[0];
  for (int i = 1; i < count; ++i) x = at::vec::maximum(x, v[i]);
  return at::vec::vec_reduce_all<acc_t>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, x);
}
template <typename acc_t>
acc_t hsum(const Vectorized<acc_t>* v, int count) {
  using Vec = Vectorized<acc_t>;
  Vec x = v[0];
  for (int i = 1; i < count; ++i) x = x + v[i];
  return at::vec::vec_reduce_all<acc_t>([](const Vec& a, const Vec& b) { return a + b; }, x);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace torch_xent
