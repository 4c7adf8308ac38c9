// The per-row code of the CUDA kernels (csrc/cuda/xent_kernel.cu): what one thread of the group,
// block or cluster that owns a row does in each pass. It is also valid host C++, so that it can be
// run on a CPU thread by thread (csrc/cuda/emulate_rows.cpp, used by tests/test_cuda.py) where no
// GPU is present. Only the reductions across threads (shuffles, shared memory, clusters) and the
// launches are CUDA-only, in xent_kernel.cu. The per-row formulas (and nan_max) are in ../xent_math.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "xent_math.h"

#if defined(__CUDACC__)
#define XENT_ROW_FN __host__ __device__ __forceinline__
#else
#define XENT_ROW_FN inline
#endif

namespace torch_xent {
namespace rows {

// ---------------------------------------------------------------------------------------------
// Element types: torch's c10::Half / c10::BFloat16 are handled as CUDA's own __half / bf16.

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };


XENT_ROW_FN float to_acc(float v) { return v; }
XENT_ROW_FN double to_acc(double v) { return v; }
XENT_ROW_FN float to_acc(__half v) { return __half2float(v); }
XENT_ROW_FN float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> XENT_ROW_FN T from_acc(typename AccOf<T>::type v);
template <> XENT_ROW_FN float from_acc<float>(float v) { return v; }
template <> XENT_ROW_FN double from_acc<double>(double v) { return v; }
template <> XENT_ROW_FN __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> XENT_ROW_FN __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The exponent is always formed as a difference first (z - shift, exact when both are large and
// close) and only then scaled: pre-scaling the shift by log2(e) would round a 1e4 logit's shift by
// ~1e-3 and cost float32 logits of that magnitude three digits of their loss.
XENT_ROW_FN float acc_exp(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return std::exp(x);
#endif
}
XENT_ROW_FN double acc_exp(double x) { return ::exp(x); }
XENT_ROW_FN float acc_log(float x) { return ::logf(x); }
XENT_ROW_FN double acc_log(double x) { return ::log(x); }

template <typename acc_t>
XENT_ROW_FN acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// The value a partial result's exponentials and target dot product are taken relative to: its max,
// or 0 while it has seen nothing but -inf (so that -inf - -inf never occurs).
template <typename acc_t>
XENT_ROW_FN acc_t ref_of(acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : m;
}

// Products that must not be contracted into an FMA with a neighbouring addition: a * x + b * y
// contracted is not symmetric in (a, b), and a butterfly needs every lane to get the same bits.
XENT_ROW_FN float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
XENT_ROW_FN double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// sum_j q_j (zc_j - from) re-expressed relative to `to`, given sum_j q_j = qsum.
template <typename acc_t>
XENT_ROW_FN acc_t rebase_dot(acc_t dot, acc_t qsum, acc_t from, acc_t to) {
  return to == from ? dot : dot - mul_rn(qsum, to - from);
}

// 16 bytes of T: the unit of every global load and store on the fast path.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kVec = 16 / sizeof(T);
  T v[kVec];
};

template <typename T>
XENT_ROW_FN Pack<T> as_pack(uint4 raw) {
  Pack<T> p;
  *reinterpret_cast<uint4*>(&p) = raw;
  return p;
}

template <typename T>
XENT_ROW_FN uint4 as_raw(const Pack<T>& p) {
  return *reinterpret_cast<const uint4*>(&p);
}

// A row is walked in 16-byte slots aligned in memory: slot s holds the elements j with
// s * kVec <= j + off < (s + 1) * kVec, where off is the row's misalignment in elements. Slots
// partly outside the valid range [jlo, jhi) are read and written element by element, and so is
// every slot of a tensor whose misalignment differs from the logits' (vec_ok == false).
// In-row indices are 32-bit (the host checks C < 2^31); row offsets (row * C) are 64-bit.
template <typename T>
XENT_ROW_FN uint4 load_slot(const T* row, int j0, int jlo, int jhi, bool vec_ok, bool streaming,
                                           T fill) {
  constexpr int kVec = Pack<T>::kVec;
  if (vec_ok && j0 >= jlo && j0 + kVec <= jhi) {
    const uint4* ptr = reinterpret_cast<const uint4*>(row + j0);
#ifdef __CUDA_ARCH__
    if (streaming) return __ldcs(ptr);  // evict-first: a cached row is not read from memory again
#endif
    (void)streaming;
    return *ptr;
  }
  Pack<T> p;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const int j = j0 + e;
    p.v[e] = (j >= jlo && j < jhi) ? row[j] : fill;
  }
  return as_raw(p);
}

template <typename T>
XENT_ROW_FN void store_slot(T* row, int j0, int jlo, int jhi, bool vec_ok, const Pack<T>& p) {
  constexpr int kVec = Pack<T>::kVec;
  if (vec_ok && j0 >= jlo && j0 + kVec <= jhi) {
#ifdef __CUDA_ARCH__
    __stcs(reinterpret_cast<uint4*>(row + j0), as_raw(p));
#else
    *reinterpret_cast<uint4*>(row + j0) = as_raw(p);
#endif
    return;
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const int j = j0 + e;
    if (j >= jlo && j < jhi) row[j] = p.v[e];
  }
}

template <typename T>
XENT_ROW_FN int misalignment(const void* ptr) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(ptr) / sizeof(T)) % Pack<T>::kVec);
}

// ---------------------------------------------------------------------------------------------
// Per-row partial results, merged in a fixed order so that the result is the same on every run.
//   m, s: running max and sum of exp(zc - m);  dot: sum_j q_j (zc_j - ref_of(m)) (its smoothing
//   part for class targets), kept relative to the max like the loss (see row_loss_shifted);
//   qsum: sum_j q_j (soft), sum_j w_j (class targets with smoothing and weights) or the count of
//   classes seen (class targets with unweighted smoothing): what `dot` needs to be rebased;
//   zy: the capped target logit (class targets; exactly one thread holds it, others hold 0).
template <typename acc_t>
struct Stats {
  acc_t m, s, dot, qsum, zy;
};

template <typename acc_t>
XENT_ROW_FN Stats<acc_t> empty_stats() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t>
XENT_ROW_FN Stats<acc_t> combine(const Stats<acc_t>& a, const Stats<acc_t>& b) {
  Stats<acc_t> r;
  r.m = nan_max(a.m, b.m);
  if (r.m == neg_inf<acc_t>()) {
    r.s = acc_t(0);  // both empty so far: avoid exp(-inf - -inf)
  } else {
    // Commutative in IEEE arithmetic (no FMA), so a butterfly leaves every lane with the same bits.
    r.s = mul_rn(a.s, acc_exp(a.m - r.m)) + mul_rn(b.s, acc_exp(b.m - r.m));
  }
  const acc_t ref = ref_of(r.m);
  r.dot = rebase_dot(a.dot, a.qsum, ref_of(a.m), ref) + rebase_dot(b.dot, b.qsum, ref_of(b.m), ref);
  r.qsum = a.qsum + b.qsum;
  r.zy = a.zy + b.zy;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Kernel parameters (passed by value, so they live in the constant bank, not in registers).
template <typename T, typename acc_t>
struct RowParams {
  const T* logits;       // (M, C); for the in-place op the same storage as grad
  T* grad;               // (M, C), or nullptr when no gradient is wanted
  const int64_t* target; // (M,) class indices, or nullptr
  const T* soft;         // (M, C) class probabilities, or nullptr
  const T* weight;       // (C,), or nullptr
  acc_t* row_loss;       // (M,)
  acc_t* lse;            // (M,)
  const acc_t* scale_ptr;  // device-side gradient scale (mean of class targets), or nullptr
  acc_t scale;             // gradient scale when scale_ptr is null
  int64_t M;
  int C;
  int64_t ignore_index;
  acc_t eps, z_loss, cap;
  int chunk_slots;       // 16-byte slots a block (or a group) handles per row
  int cluster;           // blocks per row (> 1 only on sm_90 with a cluster launch)
  bool cache;            // keep the row in shared memory for the gradient pass
};

// What the per-element loop must read besides the logits (a template argument, so that the
// common case keeps no registers for the others):
//   kHard: class targets, no per-class weight in the loop (w[y] is one scalar; smoothing unweighted)
//   kHardWeighted: class targets with label smoothing and weights (the smoothing term reads w_j)
//   kSoft: probability targets (reads t_j, and w_j when weighted)
enum Mode : int { kHard = 0, kHardWeighted = 1, kSoft = 2 };

// Independent 16-byte loads of logits a thread keeps in flight before using the first.
template <int MODE>
struct Unroll {
  static constexpr int value = MODE == kHard ? 4 : 2;
};

// Where one block (or group) works in its row: slots [0, nslots) start at element j_begin
// (negative when the row is misaligned), valid elements are [jlo, jhi).
struct Span {
  int j_begin, jlo, jhi, nslots;
};

template <typename T>
XENT_ROW_FN Span row_span(const T* zrow, int C, int chunk_slots, int rank, int nchunks) {
  constexpr int kVec = Pack<T>::kVec;
  const int off = misalignment<T>(zrow);
  const int end_a = C + off;  // one past the last element, in aligned coordinates
  const int s_lo = rank * chunk_slots;
  const int chunk_end = (s_lo + chunk_slots) * kVec;
  const int a_hi = rank + 1 == nchunks || end_a < chunk_end ? end_a : chunk_end;
  Span sp;
  sp.j_begin = s_lo * kVec - off;
  sp.jlo = sp.j_begin > 0 ? sp.j_begin : 0;
  sp.jhi = a_hi - off > sp.jlo ? a_hi - off : sp.jlo;
  const int slots = (a_hi + kVec - 1) / kVec - s_lo;
  sp.nslots = slots > 0 ? slots : 0;
  return sp;
}

// Per-row constants of the target distribution, shared by both passes.
template <typename acc_t>
struct TargetTerms {
  int y;              // class index (class targets), -1 for soft targets
  bool smooth_on;     // class targets with label smoothing
  acc_t keep, uniform;  // soft targets: q_j = w_j * (keep * t_j + uniform)
};

// Loads one batch of U slots (logits, and the soft target / weights when the mode needs them).
// Slots past the span and elements outside [jlo, jhi) read as -inf logits, so that the batch max
// needs no mask.
template <typename T, typename acc_t, int MODE, int U>
XENT_ROW_FN void load_batch(const RowParams<T, acc_t>& p, const T* zrow, const T* trow, const Span& sp,
                                           int base, int nthreads, bool t_vec, bool w_vec, bool streaming,
                                           const uint4* cache, uint4 (&raw)[U], uint4 (&traw)[U], uint4 (&wraw)[U]) {
  constexpr int kVec = Pack<T>::kVec;
  const T minus_inf = from_acc<T>(neg_inf<acc_t>());
  const T zero = from_acc<T>(acc_t(0));
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int ls = base + u * nthreads;
    const int j0 = sp.j_begin + ls * kVec;
    const bool in = ls < sp.nslots;
    const int hi = in ? sp.jhi : sp.jlo;  // slots past the span read as fill values only
    if (cache != nullptr && in) {
      raw[u] = cache[ls];
    } else {
      raw[u] = load_slot(zrow, j0, sp.jlo, hi, true, streaming, minus_inf);
    }
    if (MODE == kSoft) traw[u] = load_slot(trow, j0, sp.jlo, hi, t_vec, true, zero);
    if (MODE == kHardWeighted || (MODE == kSoft && p.weight != nullptr))
      wraw[u] = load_slot(p.weight, j0, sp.jlo, hi, w_vec, false, zero);
  }
}

// True when every element of the batch starting at slot `base` is valid (the common case: only a
// span's first and last slots can be partial).
template <typename T>
XENT_ROW_FN bool batch_full(const Span& sp, int base, int nthreads, int U) {
  constexpr int kVec = Pack<T>::kVec;
  const int last = base + (U - 1) * nthreads;
  return last < sp.nslots && sp.j_begin + base * kVec >= sp.jlo && sp.j_begin + (last + 1) * kVec <= sp.jhi;
}

// Pass 1 for one batch: online max / sum-exp and the target terms. FULL: no element is masked.
template <typename T, typename acc_t, int MODE, bool FULL, int U>
XENT_ROW_FN void scan_batch(const RowParams<T, acc_t>& p, const TargetTerms<acc_t>& tt,
                                           const Span& sp, int base, int nthreads, const uint4 (&raw)[U],
                                           const uint4 (&traw)[U], const uint4 (&wraw)[U], Stats<acc_t>& st) {
  constexpr int kVec = Pack<T>::kVec;
  const acc_t cap = p.cap;
  // softcap is increasing, so the max of the capped logits is the cap of the raw max (NaN stays NaN).
  acc_t bmax = neg_inf<acc_t>();
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const Pack<T> zp = as_pack<T>(raw[u]);
#pragma unroll
    for (int e = 0; e < kVec; ++e) bmax = nan_max(bmax, to_acc(zp.v[e]));
  }
  const acc_t new_m = nan_max(st.m, softcap_value(bmax, cap));
  // Until a finite logit is seen every exp below is 0; shifting by 0 avoids -inf - -inf.
  const acc_t shift = ref_of(new_m);
  st.dot = rebase_dot(st.dot, st.qsum, ref_of(st.m), shift);
  acc_t s = st.s * acc_exp(st.m - shift);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int ls = base + u * nthreads;
    const int j0 = sp.j_begin + ls * kVec;
    const Pack<T> zp = as_pack<T>(raw[u]);
    // Position of the target class in this slot, or -1 (a slot past the span may cover the class in
    // another cluster block's share: that block reports it).
    const int ey = (MODE != kSoft && (FULL || ls < sp.nslots) && tt.y >= j0 && tt.y < j0 + kVec) ? tt.y - j0 : -1;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const bool valid = FULL || (j0 + e >= sp.jlo && j0 + e < sp.jhi && ls < sp.nslots);
      const acc_t zc = softcap_value(to_acc(zp.v[e]), cap);
      const acc_t zs = zc - shift;
      const acc_t ex = acc_exp(zs);
      s += valid ? ex : acc_t(0);
      if (MODE == kSoft) {
        acc_t q = tt.keep * to_acc(as_pack<T>(traw[u]).v[e]) + tt.uniform;
        if (p.weight != nullptr) q *= to_acc(as_pack<T>(wraw[u]).v[e]);
        if (valid) {
          st.qsum += q;
          st.dot += weighted_logit(q, zs);
        }
      } else {
        if (e == ey) st.zy = zc;
        if (MODE == kHardWeighted) {
          const acc_t w = to_acc(as_pack<T>(wraw[u]).v[e]);
          if (valid) {
            st.qsum += w;
            st.dot += weighted_logit(w, zs);
          }
        } else if (tt.smooth_on && valid) {
          st.qsum += acc_t(1);
          st.dot += zs;
        }
      }
    }
  }
  st.s = s;
  st.m = new_m;
}

// Pass 1: the thread's share of the online max / sum-exp and the target terms, caching the raw
// logits in `cache` (slot ls of this span at cache[ls]) when it is not null.
template <typename T, typename acc_t, int MODE>
XENT_ROW_FN Stats<acc_t> scan_row(const RowParams<T, acc_t>& p, const TargetTerms<acc_t>& tt,
                                                 const T* zrow, const T* trow, const Span& sp, int lane,
                                                 int nthreads, uint4* cache) {
  constexpr int U = Unroll<MODE>::value;
  const bool t_vec = MODE == kSoft && misalignment<T>(trow) == misalignment<T>(zrow);
  const bool w_vec = p.weight != nullptr && misalignment<T>(p.weight) == misalignment<T>(zrow);
  Stats<acc_t> st = empty_stats<acc_t>();
  for (int base = lane; base < sp.nslots; base += nthreads * U) {
    uint4 raw[U], traw[U], wraw[U];
    load_batch<T, acc_t, MODE, U>(p, zrow, trow, sp, base, nthreads, t_vec, w_vec, cache != nullptr, nullptr, raw,
                                  traw, wraw);
    if (cache != nullptr) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int ls = base + u * nthreads;
        if (ls < sp.nslots) cache[ls] = raw[u];
      }
    }
    if (batch_full<T>(sp, base, nthreads, U)) {
      scan_batch<T, acc_t, MODE, true, U>(p, tt, sp, base, nthreads, raw, traw, wraw, st);
    } else {
      scan_batch<T, acc_t, MODE, false, U>(p, tt, sp, base, nthreads, raw, traw, wraw, st);
    }
  }
  return st;
}

// Per-row scalars the gradient pass needs, with the reduction's scale folded in.
template <typename acc_t>
struct RowResult {
  acc_t ref;       // the row max (0 for a row of -inf), and log sum_j exp(zc_j - ref):
  acc_t log_sum;   // p_j = exp((zc_j - ref) - log_sum), exact for logits of large magnitude
  acc_t coef;      // scale * (sum_q + 2 z_loss lse)
  acc_t target_q;  // scale * (1 - eps) * w_y
  acc_t smooth;    // scale * eps / C
  acc_t scale;     // the reduction's scale (soft targets)
};

// Pass 2: grad_j = scale * (coef * exp(zc_j - lse) - q_j) * chain_j, from the cached copy when
// there is one (each thread reads back exactly the slots it wrote), else from global memory.
template <typename T, typename acc_t, int MODE>
XENT_ROW_FN void write_grad(const RowParams<T, acc_t>& p, const TargetTerms<acc_t>& tt,
                                           const T* zrow, const T* trow, T* grow, const Span& sp, int lane,
                                           int nthreads, const uint4* cache, const RowResult<acc_t>& r) {
  constexpr int kVec = Pack<T>::kVec;
  constexpr int U = Unroll<MODE>::value;
  const bool t_vec = MODE == kSoft && misalignment<T>(trow) == misalignment<T>(zrow);
  const bool w_vec = p.weight != nullptr && misalignment<T>(p.weight) == misalignment<T>(zrow);
  const bool g_vec = misalignment<T>(grow) == misalignment<T>(zrow);
  const acc_t cap = p.cap;
  for (int base = lane; base < sp.nslots; base += nthreads * U) {
    uint4 raw[U], traw[U], wraw[U];
    load_batch<T, acc_t, MODE, U>(p, zrow, trow, sp, base, nthreads, t_vec, w_vec, true, cache, raw, traw, wraw);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int ls = base + u * nthreads;
      if (ls >= sp.nslots) continue;
      const int j0 = sp.j_begin + ls * kVec;
      const int ey = (MODE != kSoft && tt.y >= j0 && tt.y < j0 + kVec) ? tt.y - j0 : -1;
      const Pack<T> zp = as_pack<T>(raw[u]);
      Pack<T> out;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const acc_t zc = softcap_value(to_acc(zp.v[e]), cap);
        acc_t q;
        if (MODE == kSoft) {
          q = tt.keep * to_acc(as_pack<T>(traw[u]).v[e]) + tt.uniform;
          if (p.weight != nullptr) q *= to_acc(as_pack<T>(wraw[u]).v[e]);
          q *= r.scale;
        } else {
          q = e == ey ? r.target_q : acc_t(0);
          if (MODE == kHardWeighted) {
            q += r.smooth * to_acc(as_pack<T>(wraw[u]).v[e]);
          } else if (tt.smooth_on) {
            q += r.smooth;
          }
        }
        acc_t g = softmax_grad(r.coef, acc_exp((zc - r.ref) - r.log_sum), q);
        if (cap > acc_t(0)) g *= softcap_chain(zc, cap);
        out.v[e] = from_acc<T>(g);
      }
      store_slot(grow, j0, sp.jlo, sp.jhi, g_vec, out);
    }
  }
}

template <typename T, typename acc_t>
XENT_ROW_FN void fill_grad(T* grow, const T* zrow, const Span& sp, int lane, int nthreads, acc_t value) {
  constexpr int kVec = Pack<T>::kVec;
  const bool g_vec = misalignment<T>(grow) == misalignment<T>(zrow);
  Pack<T> out;
#pragma unroll
  for (int e = 0; e < kVec; ++e) out.v[e] = from_acc<T>(value);
  for (int ls = lane; ls < sp.nslots; ls += nthreads) store_slot(grow, sp.j_begin + ls * kVec, sp.jlo, sp.jhi, g_vec, out);
}

// Per-row constants of the target distribution (y is -1 until the row's class target sets it).
template <typename T, typename acc_t, int MODE>
XENT_ROW_FN TargetTerms<acc_t> target_terms(const RowParams<T, acc_t>& p) {
  TargetTerms<acc_t> tt;
  tt.y = -1;
  tt.smooth_on = MODE != kSoft && p.eps > acc_t(0);
  tt.keep = acc_t(1) - p.eps;
  tt.uniform = p.eps / static_cast<acc_t>(p.C);
  return tt;
}

// A class target with which the row counts for nothing: ignore_index (value 0, whatever the row's
// logits hold), or outside [0, C) (value NaN: the kernel cannot raise without a host sync, so the row
// is poisoned instead). False for a target that counts.
template <typename acc_t>
XENT_ROW_FN bool skipped_row(int64_t y, int64_t ignore_index, int C, acc_t& value) {
  if (y != ignore_index && y >= 0 && y < C) return false;
  value = y == ignore_index ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
  return true;
}

// A row's loss and lse from its combined statistics, and the gradient pass's scalars before the
// reduction's scale (scale_result folds it in). Everything relative to the row max, as PyTorch's
// log_softmax does (row_loss_shifted).
template <typename acc_t, int MODE>
XENT_ROW_FN RowResult<acc_t> finish_row(const Stats<acc_t>& st, const TargetTerms<acc_t>& tt, acc_t wy, int C,
                                        acc_t eps, acc_t z_loss, acc_t& loss, acc_t& lse) {
  RowResult<acc_t> r;
  r.ref = ref_of(st.m);
  r.log_sum = acc_log(st.s);
  lse = st.m == neg_inf<acc_t>() ? neg_inf<acc_t>() : st.m + r.log_sum;
  acc_t sum_q, q_dot_z;
  r.target_q = acc_t(0);
  r.smooth = acc_t(0);
  if (MODE == kSoft) {
    sum_q = st.qsum;
    q_dot_z = st.dot;
  } else {
    const acc_t weight_total = MODE == kHardWeighted ? st.qsum : static_cast<acc_t>(C);
    const HardTargetCoef<acc_t> k = hard_target_coef(eps, wy, weight_total, C);
    r.target_q = k.target_q;
    r.smooth = k.smooth;
    sum_q = k.sum_q;
    q_dot_z = weighted_logit(k.target_q, st.zy - r.ref) + (tt.smooth_on ? k.smooth * st.dot : acc_t(0));
  }
  loss = row_loss_shifted(r.log_sum, lse, sum_q, q_dot_z, z_loss);
  r.coef = softmax_coef(lse, sum_q, z_loss);
  r.scale = acc_t(1);
  return r;
}

template <typename acc_t>
XENT_ROW_FN void scale_result(RowResult<acc_t>& r, acc_t scale) {
  r.coef *= scale;
  r.target_q *= scale;
  r.smooth *= scale;
  r.scale = scale;
}

// The whole per-row computation for one thread of the group (or block / cluster) that owns the row.
// reduce(stats) must return the group-wide combination, identical in every thread.
template <typename T, typename acc_t, int MODE, typename Reduce>
XENT_ROW_FN void process_row(const RowParams<T, acc_t>& p, int64_t row, int rank, int lane,
                                            int nthreads, uint4* cache, Reduce reduce) {
  const int C = p.C;
  const T* zrow = p.logits + row * C;
  const T* trow = MODE == kSoft ? p.soft + row * C : nullptr;
  T* grow = p.grad != nullptr ? p.grad + row * C : nullptr;
  const Span sp = row_span(zrow, C, p.chunk_slots, rank, p.cluster);
  const bool writer = rank == 0 && lane == 0;

  TargetTerms<acc_t> tt = target_terms<T, acc_t, MODE>(p);
  acc_t wy = acc_t(1);
  if (MODE != kSoft) {
    const int64_t y = p.target[row];
    acc_t v;
    if (skipped_row(y, p.ignore_index, C, v)) {  // the row is not read
      if (writer) {
        p.row_loss[row] = v;
        p.lse[row] = v;
      }
      if (grow != nullptr) fill_grad(grow, zrow, sp, lane, nthreads, v);
      return;  // uniform over the whole group / block / cluster: no barrier is skipped by some only
    }
    tt.y = static_cast<int>(y);
    if (p.weight != nullptr) wy = to_acc(p.weight[y]);
  }

  Stats<acc_t> st = scan_row<T, acc_t, MODE>(p, tt, zrow, trow, sp, lane, nthreads, grow ? cache : nullptr);
  st = reduce(st);
  acc_t loss, lse;
  RowResult<acc_t> r = finish_row<acc_t, MODE>(st, tt, wy, C, p.eps, p.z_loss, loss, lse);
  if (writer) {
    p.row_loss[row] = loss;
    p.lse[row] = lse;
  }
  if (grow != nullptr) {
    scale_result(r, p.scale_ptr != nullptr ? *p.scale_ptr : p.scale);
    write_grad<T, acc_t, MODE>(p, tt, zrow, trow, grow, sp, lane, nthreads, cache, r);
  }
}

}  // namespace rows
}  // namespace torch_xent
