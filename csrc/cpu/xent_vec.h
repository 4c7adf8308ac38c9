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
#include <type_traits>

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
  static XENT_INLINE Vec exp(const Vec& x);  // vexp, below
};

// bfloat16 and float16 are computed in float32: one vector of them is two float vectors.
// On x86 each float vector is widened straight from its half of memory (a zero-extending or
// converting load, no extraction of the upper half), which is what ATen's conversion computes, bit for
// bit: a bfloat16 is the upper 16 bits of its float, a float16 converts exactly.
template <typename half_t>
struct HalfBlock {
  using acc_t = float;
  using Vec = Vectorized<float>;
  using HVec = Vectorized<half_t>;
  static constexpr int kVecs = 2;
  static constexpr int64_t kSize = HVec::size();
  static_assert(HVec::size() == 2 * Vec::size(), "one half-precision vector converts to two float vectors");
  static constexpr bool kBF16 = std::is_same<half_t, c10::BFloat16>::value;
  static constexpr bool kAnyOrder = true;  // load_any_order below
  static XENT_INLINE void load(const half_t* p, Vec* v) {
#if defined(CPU_CAPABILITY_AVX512)
    for (int i = 0; i < 2; ++i) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * i));
      if constexpr (kBF16) {
        v[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else {
        v[i] = _mm512_cvtph_ps(h);
      }
    }
#elif defined(CPU_CAPABILITY_AVX2)
    for (int i = 0; i < 2; ++i) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * i));
      if constexpr (kBF16) {
        v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      } else {
        v[i] = _mm256_cvtph_ps(h);
      }
    }
#else
    std::tie(v[0], v[1]) = at::vec::convert_to_float<half_t>(HVec::loadu(p));
#endif
  }
  // The block's elements in some order of lanes, for the max, which does not depend on it: a
  // bfloat16 pair in a 32-bit lane is two floats, the upper one masked, the lower one shifted up.
  static XENT_INLINE void load_any_order(const half_t* p, Vec* v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kBF16) {
      const __m512i h = _mm512_loadu_si512(p);
      v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
      v[1] = _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (kBF16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
      v[1] = _mm256_castsi256_ps(_mm256_and_si256(h, _mm256_set1_epi32(int32_t(0xFFFF0000u))));
      return;
    }
#endif
    load(p, v);
  }
  static XENT_INLINE void store(half_t* p, const Vec* v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (!kBF16) {  // round to nearest even, as ATen's conversion
      for (int i = 0; i < 2; ++i) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16 * i),
                            _mm512_cvtps_ph(v[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (!kBF16) {
      for (int i = 0; i < 2; ++i) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8 * i),
                         _mm256_cvtps_ph(v[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      }
      return;
    }
#endif
    at::vec::convert_from_float<half_t>(v[0], v[1]).store(p);
  }
  static XENT_INLINE Vec exp(const Vec& x);  // vexp_half, below
};
#if defined(TORCH_XENT_AVX512_BF16)
// One instruction converts two float vectors to one bfloat16 vector, rounding to nearest even (as
// ATen's dozen integer instructions do), NaN to NaN, and denormal results to 0.
template <>
struct Block<c10::BFloat16> : HalfBlock<c10::BFloat16> {
  static XENT_INLINE void store(c10::BFloat16* p, const Vec* v) {
    _mm512_storeu_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(v[1], v[0])));
  }
};
#else
template <>
struct Block<c10::BFloat16> : HalfBlock<c10::BFloat16> {};
#endif
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
  // max(c, x) returns x when x is NaN; exp(-110) is below float's smallest denormal. No clamp from
  // above: the arguments are <= 0 up to rounding, far below exp's overflow at 88.7.
  x = XENT_PS(max)(XENT_PS(set1)(-110.0f), x);
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

// exp for the kernel's arguments when the logits are bfloat16 or float16: the same contract as vexp
// (arguments <= 0 up to rounding, or -inf, or NaN), with fewer instructions. The argument z - m is
// exact (a difference of two half-precision values), and the result feeds a float32 sum and a
// gradient rounded to 8 or 11 bits; what bounds the error is the lse, returned in float32, so the
// error stays near float32's rounding (below 3e-7 relative, see the accuracy test) rather than at the
// inputs' 2^-9 or 2^-12.
//   AVX512: exp(x) = 2^floor(k/32) 2^((k mod 32)/32) exp(r), k = round(32 x / ln 2), r = x - (k/32) ln2
//           in [-ln2/64, ln2/64]. The 32 values 2^(j/32) sit in two registers, one permute picks them;
//           exp(r) is a degree-2 polynomial fitted for relative error on that interval (5.6e-8). k
//           comes from adding 1.5 * 2^18 (whose ulp is 1/32) to x / ln 2: the sum's low mantissa bits
//           are k mod 32, the table index. A single fused r = x - n ln2 with ln2 rounded to float errs
//           by |n| 1.9e-9, below 1.7e-7 down to exp's underflow at -87.
//   AVX2:   exp(x) = 2^n exp(r), n = round(x / ln 2), with the same single-step reduction and a degree-5
//           polynomial fitted for relative error on [-ln2/2, ln2/2] (1.3e-7), one degree and one fused
//           step less than vexp.
// DEFAULT (portable) builds use vexp.
template <typename Vec>
inline Vec vexp_half(const Vec& x) {
  return vexp(x);
}
#if defined(CPU_CAPABILITY_AVX512)
template <>
XENT_INLINE Vectorized<float> vexp_half(const Vectorized<float>& v) {
  // 2^(j / 32) rounded to float, j = 0..31.
  alignas(64) static constexpr float kTable[32] = {
      1.0f, 1.0218972f, 1.04427373f, 1.06714046f, 1.09050775f, 1.1143868f, 1.13878858f, 1.1637249f, 1.18920708f,
      1.21524739f, 1.24185777f, 1.26905096f, 1.29683959f, 1.32523668f, 1.35425556f, 1.38390994f, 1.41421354f,
      1.44518077f, 1.47682619f, 1.50916445f, 1.54221082f, 1.5759809f, 1.61049032f, 1.64575553f, 1.68179286f,
      1.71861935f, 1.75625217f, 1.79470909f, 1.8340081f, 1.87416768f, 1.91520655f, 1.95714414f};
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-110.0f), v);  // NaN stays NaN; exp(-110) is 0 in float
  const __m512 magic = _mm512_set1_ps(393216.0f);               // 1.5 * 2^18
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 n = _mm512_sub_ps(t, magic);  // k / 32, exactly
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f), x);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(4.999962747e-01f), r, _mm512_set1_ps(1.000014901e+00f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 two_frac = _mm512_permutex2var_ps(_mm512_load_ps(kTable), _mm512_castps_si512(t),
                                                 _mm512_load_ps(kTable + 16));
  return _mm512_scalef_ps(_mm512_mul_ps(p, two_frac), n);  // scalef multiplies by 2^floor(n)
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
XENT_INLINE Vectorized<float> vexp_half(const Vectorized<float>& v) {
  const __m256 x = _mm256_max_ps(_mm256_set1_ps(-110.0f), v);
  // 1.5 * 2^23 + 127: the sum's low mantissa bits are n + 127, the biased exponent of 2^n.
  const __m256 magic = _mm256_set1_ps(12583039.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147180559945309f), x);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(8.296939544e-03f), r, _mm256_set1_ps(4.192034900e-02f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666761190e-01f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.999884963e-01f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(9.999997020e-01f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.000000119e+00f));
  // 2^n in the exponent field; n < -126 (x below about -87.3) is flushed to 0, as is -inf.
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
  const __m256 too_small = _mm256_cmp_ps(n, _mm256_set1_ps(-126.0f), _CMP_LT_OQ);
  return _mm256_andnot_ps(too_small, _mm256_mul_ps(p, two_n));
}
#endif

template <typename scalar_t>
XENT_INLINE Vectorized<scalar_t> Block<scalar_t>::exp(const Vectorized<scalar_t>& x) {
  return vexp(x);
}
template <typename half_t>
XENT_INLINE Vectorized<float> HalfBlock<half_t>::exp(const Vectorized<float>& x) {
  return vexp_half(x);
}

// q * z lane by lane, with q == 0 counting as 0 even where z = -inf: the vector form of
// weighted_logit in xent_math.h (brought in here, so that both forms are found by that name).
using torch_xent::weighted_logit;
template <typename acc_t>
XENT_INLINE Vectorized<acc_t> weighted_logit(const Vectorized<acc_t>& q, const Vectorized<acc_t>& z) {
  using Vec = Vectorized<acc_t>;
  return Vec::blendv(q * z, Vec(acc_t(0)), q == Vec(acc_t(0)));
}

// max(acc, v) lane by lane where a NaN in v is skipped (acc itself is never NaN): one instruction,
// where at::vec::maximum needs three more to propagate NaN. The kernels do not need the max to
// carry a NaN: exp(NaN - max) makes the chunk's sum of exponentials NaN, and from there the row's
// log-sum-exp, loss and gradient (a chunk whose other logits are all -inf is checked on its own).
template <typename acc_t>
XENT_INLINE Vectorized<acc_t> max_skip_nan(const Vectorized<acc_t>& acc, const Vectorized<acc_t>& v) {
  return Vectorized<acc_t>::blendv(acc, v, v > acc);
}
#if defined(CPU_CAPABILITY_AVX512)
template <>
XENT_INLINE Vectorized<float> max_skip_nan(const Vectorized<float>& acc, const Vectorized<float>& v) {
  return _mm512_max_ps(v, acc);  // the second operand where either is NaN
}
template <>
XENT_INLINE Vectorized<double> max_skip_nan(const Vectorized<double>& acc, const Vectorized<double>& v) {
  return _mm512_max_pd(v, acc);
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
XENT_INLINE Vectorized<float> max_skip_nan(const Vectorized<float>& acc, const Vectorized<float>& v) {
  return _mm256_max_ps(v, acc);
}
template <>
XENT_INLINE Vectorized<double> max_skip_nan(const Vectorized<double>& acc, const Vectorized<double>& v) {
  return _mm256_max_pd(v, acc);
}
#endif

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
