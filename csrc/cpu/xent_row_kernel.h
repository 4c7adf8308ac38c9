// The CPU row kernel (compiled once per instruction set, see xent_rows.h).
//
// Per row, the logits are read from memory once, a chunk at a time (kChunk elements, which stay in
// L1): a first loop over the chunk takes its max (and the target terms), a second loop sums
// exp(z - chunk max) and, when a gradient is wanted, keeps those exponentials in a per-thread
// scratch row of the accumulation type. The chunks' (max, sum) pairs combine into the row's
// log-sum-exp, and the gradient pass then reads the scratch row (in L2), rescales each chunk by
// exp(chunk max - lse) and writes the gradient: one exp per element, one read of the logits and one
// write of the gradient (into the logits themselves for the in-place op, whose row is still cached).
// With a softcap the scratch row holds the capped logits instead and the gradient pass takes a
// second exp. Sums of q_j zc_j are taken relative to the chunk and then the row max, so that logits
// of magnitude 1e4 lose no digits. A row whose max is +-inf is NaN throughout, as in the reference
// (its max-shifted terms are inf - inf).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/xent_cpu.h"
#include "cpu/xent_scratch.h"
#include "cpu/xent_vec.h"
#include "xent_math.h"

namespace torch_xent {
namespace cpu {
namespace CPU_CAPABILITY {

template <typename scalar_t, bool kProb, bool kSoftcap, bool kGrad>
class RowKernel {
  using B = Block<scalar_t>;
  using acc_t = typename B::acc_t;
  using Vec = typename B::Vec;
  static constexpr int K = B::kVecs;
  static constexpr int64_t kS = B::kSize;      // elements per block
  static constexpr int64_t kVS = Vec::size();  // elements per acc_t vector
  // Elements per chunk: 8 KiB of acc_t, so a chunk's logits and exponentials both stay in L1.
  static constexpr int64_t kChunk =
      (int64_t(8192) / int64_t(sizeof(acc_t))) / kS * kS > kS ? (int64_t(8192) / int64_t(sizeof(acc_t))) / kS * kS
                                                               : kS;
  static constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  // Whether the max pass may load a block in another order of lanes, which is cheaper for half
  // precision (see HalfBlock::load_any_order); not with a softcap, whose pass stores the capped block.
  template <typename T, typename = void>
  struct AnyOrder : std::false_type {};
  template <typename T>
  struct AnyOrder<T, std::void_t<decltype(T::kAnyOrder)>> : std::bool_constant<T::kAnyOrder> {};
  static constexpr bool kAnyOrderMax = AnyOrder<B>::value && !kSoftcap;

 public:
  explicit RowKernel(const RowsArgs& a)
      : C_(a.classes),
        logits_(static_cast<const scalar_t*>(a.logits)),
        grad_(static_cast<scalar_t*>(a.grad)),
        target_(a.target),
        prob_(static_cast<const scalar_t*>(a.target_prob)),
        weight_(static_cast<const acc_t*>(a.weight)),
        row_loss_(static_cast<acc_t*>(a.row_loss)),
        lse_(static_cast<acc_t*>(a.lse)),
        ignore_index_(a.ignore_index),
        eps_(static_cast<acc_t>(a.label_smoothing)),
        smooth_(static_cast<acc_t>(a.label_smoothing / static_cast<double>(a.classes))),
        z_loss_(static_cast<acc_t>(a.z_loss)),
        cap_(static_cast<acc_t>(a.softcap)),
        inv_cap_(a.softcap > 0 ? static_cast<acc_t>(1.0 / a.softcap) : acc_t(0)),
        scale_(static_cast<acc_t>(a.grad_scale)),
        weight_total_(static_cast<acc_t>(a.weight_total)),
        num_chunks_((a.classes + kChunk - 1) / kChunk),
        padded_((a.classes + kS - 1) / kS * kS) {}

  void run(int64_t begin, int64_t end) {
    const int64_t scratch_len = (kGrad || kSoftcap) ? padded_ : 0;
    acc_t* buf = static_cast<acc_t*>(thread_scratch(static_cast<size_t>(scratch_len + 4 * num_chunks_) * sizeof(acc_t)));
    scratch_ = buf;
    chunk_max_ = buf + scratch_len;
    chunk_sum_ = chunk_max_ + num_chunks_;
    chunk_qsum_ = chunk_sum_ + num_chunks_;
    chunk_qz_ = chunk_qsum_ + num_chunks_;
    for (int64_t i = begin; i < end; ++i) {
      if constexpr (kProb) {
        prob_row(i);
      } else {
        class_row(i);
      }
    }
  }

 private:
  // ---- loads and stores of one block at column j with n valid elements (n < kS only at the row's end).
  // The partial block goes through a small buffer copied element by element (no library call, so the
  // hot loops around it keep their vectors in registers).
  static void load_partial(const scalar_t* p, int64_t n, scalar_t fill, Vec* v) {
    scalar_t tmp[kS];
    for (int64_t k = 0; k < kS; ++k) tmp[k] = k < n ? p[k] : fill;
    B::load(tmp, v);
  }
  // Lanes past the row's end hold -inf: they change neither the max nor the sum of exponentials.
  static XENT_INLINE void load_logits(const scalar_t* p, int64_t n, Vec* v) {
    if (n == kS) {
      B::load(p, v);
    } else {
      load_partial(p, n, static_cast<scalar_t>(-std::numeric_limits<float>::infinity()), v);
    }
  }
  static XENT_INLINE void store_grad(scalar_t* p, int64_t n, const Vec* v) {
    if (n == kS) {
      B::store(p, v);
    } else {
      scalar_t tmp[kS];
      B::store(tmp, v);
      for (int64_t k = 0; k < n; ++k) p[k] = tmp[k];
    }
  }
  static XENT_INLINE void load_acc(const acc_t* p, Vec* v) {
    for (int i = 0; i < K; ++i) v[i] = Vec::loadu(p + i * kVS);
  }
  static XENT_INLINE void store_acc(acc_t* p, const Vec* v) {
    for (int i = 0; i < K; ++i) v[i].store(p + i * kVS);
  }
  // All-ones lanes for the valid elements of vector i of a block holding n elements.
  static XENT_INLINE Vec lane_mask(int i, int64_t n) {
    return Vec::arange(static_cast<acc_t>(i * kVS), acc_t(1)) < Vec(static_cast<acc_t>(n));
  }
  // Class weights of the block (1 without weights), 0 past the row's end.
  XENT_INLINE void load_weight(int64_t j, int64_t n, Vec* w) const {
    if (weight_ != nullptr) {
      if (n == kS) {
        load_acc(weight_ + j, w);
      } else {
        acc_t tmp[kS];
        for (int64_t k = 0; k < kS; ++k) tmp[k] = k < n ? weight_[j + k] : acc_t(0);
        load_acc(tmp, w);
      }
    } else {
      for (int i = 0; i < K; ++i) {
        w[i] = n == kS ? Vec(acc_t(1)) : Vec::blendv(Vec(acc_t(0)), Vec(acc_t(1)), lane_mask(i, n));
      }
    }
  }
  // The part of the target distribution beyond the class target, 0 past the row's end:
  // q = w * ((1 - eps) t + eps / C) for probabilities, q = w * eps / C for a smoothed class target.
  XENT_INLINE void load_q(const scalar_t* t, int64_t j, int64_t n, Vec* q) const {
    Vec w[K];
    load_weight(j, n, w);
    if constexpr (kProb) {
      Vec tv[K];
      if (n == kS) {
        B::load(t + j, tv);
      } else {
        load_partial(t + j, n, scalar_t(0), tv);
      }
      const Vec a(acc_t(1) - eps_), b(smooth_);
      for (int i = 0; i < K; ++i) q[i] = at::vec::fmadd(tv[i], a, b) * w[i];
    } else {
      for (int i = 0; i < K; ++i) q[i] = w[i] * Vec(smooth_);
    }
  }
  acc_t q_at(const scalar_t* t, int64_t j) const {
    const acc_t w = weight_ != nullptr ? weight_[j] : acc_t(1);
    if constexpr (kProb) {
      return w * ((acc_t(1) - eps_) * static_cast<acc_t>(t[j]) + smooth_);
    } else {
      return w * smooth_;
    }
  }
  acc_t capped(acc_t z) const { return softcap_value(z, cap_); }

  // Visits the blocks of columns [c0, c1) as f(j, n, slot): full blocks two at a time, alternating
  // between two accumulator slots (two independent dependency chains), then the partial block at
  // the row's end, if any. n is the constant kS in the loop, so the partial-block code folds away.
  template <typename F>
  static XENT_INLINE void for_blocks(int64_t c0, int64_t c1, F&& f) {
    const int64_t full = c0 + (c1 - c0) / kS * kS;
    int64_t j = c0;
    for (; j + 2 * kS <= full; j += 2 * kS) {
      f(j, kS, 0);
      f(j + kS, kS, 1);
    }
    if (j < full) {
      f(j, kS, 0);
      j += kS;
    }
    if (j < c1) f(j, c1 - j, 1);
  }

  struct Stats {
    acc_t max;      // of the (capped) logits, NaN if any is NaN
    acc_t log_sum;  // log sum_j exp(zc_j - max)
    acc_t sum_q;    // probability targets: sum_j q_j
    acc_t qz;       // sum_j q_j (zc_j - max) over the probability / smoothing part of q (0 where q_j = 0)
  };

  // The read of the logits (and of the probability targets). Per chunk: the max, then
  // sum exp(zc - chunk max) (kept in the scratch row for the gradient) and the target terms relative
  // to the chunk max; the chunks then combine relative to the row max, so that logits of magnitude
  // 1e4 lose no digits (the loss is sum_q * log_sum - sum_j q_j (zc_j - max), as the reference has it).
  // need_q: the target distribution has a part beyond the class target (smoothing or probabilities).
  Stats pass_a(const scalar_t* z, const scalar_t* t, bool need_q) {
    acc_t* scratch = scratch_;
    acc_t row_max = -kInf;
    for (int64_t k = 0, c0 = 0; c0 < C_; ++k, c0 += kChunk) {
      const int64_t c1 = std::min(C_, c0 + kChunk);
      Vec vmax[2 * K];
      for (int i = 0; i < 2 * K; ++i) vmax[i] = Vec(-kInf);
      for_blocks(c0, c1, [&](int64_t j, int64_t n, int slot) XENT_LAMBDA_INLINE {
        Vec v[K];
        if constexpr (kAnyOrderMax) {
          if (n == kS) {
            B::load_any_order(z + j, v);  // the max does not depend on the order of the lanes
          } else {
            load_logits(z + j, n, v);
          }
        } else {
          load_logits(z + j, n, v);
        }
        if constexpr (kSoftcap) {
          for (int i = 0; i < K; ++i) {
            v[i] = Vec(cap_) * (v[i] * Vec(inv_cap_)).tanh();
            if (n < kS) v[i] = Vec::blendv(Vec(-kInf), v[i], lane_mask(i, n));
          }
          store_acc(scratch + j, v);
        }
        for (int i = 0; i < K; ++i) vmax[slot * K + i] = max_skip_nan(vmax[slot * K + i], v[i]);
      });
      acc_t m = hmax(vmax, 2 * K);  // of the chunk's logits that are not NaN
      if (m == -kInf && chunk_has_nan(z, c0, c1)) m = std::numeric_limits<acc_t>::quiet_NaN();
      acc_t s = 0, qsum = 0, qz = 0;
      if (m == -kInf) {
        // Every logit of the chunk is -inf: exp(-inf - (-inf)) would be NaN, the truth is 0; and
        // q_j (zc_j - max) is -inf wherever q_j != 0.
        if (kGrad && !kSoftcap) {
          for (int64_t j = c0, e = std::min(padded_, c0 + kChunk); j < e; ++j) scratch[j] = acc_t(0);
        }
        if (need_q) {
          for (int64_t j = c0; j < c1; ++j) {
            const acc_t q = q_at(t, j);
            qsum += q;
            if (q != acc_t(0)) qz = -kInf;
          }
        }
      } else {
        const Vec vm(m);
        Vec vs[2 * K], vq[2 * K], vqz[2 * K];
        for (int i = 0; i < 2 * K; ++i) {
          vs[i] = Vec(acc_t(0));
          vq[i] = Vec(acc_t(0));
          vqz[i] = Vec(acc_t(0));
        }
        for_blocks(c0, c1, [&](int64_t j, int64_t n, int slot) XENT_LAMBDA_INLINE {
          // The next chunk's logits (or the next row's), fetched while this one is computed: its
          // max loop then reads from cache instead of waiting on memory. A block is one cache line.
          __builtin_prefetch(z + j + kChunk, 0, 3);
          Vec v[K];
          if constexpr (kSoftcap) {
            load_acc(scratch + j, v);
          } else {
            load_logits(z + j, n, v);
          }
          for (int i = 0; i < K; ++i) v[i] = v[i] - vm;
          if (need_q) {
            Vec q[K];
            load_q(t, j, n, q);
            for (int i = 0; i < K; ++i) {
              vq[slot * K + i] = vq[slot * K + i] + q[i];
              vqz[slot * K + i] = vqz[slot * K + i] + weighted_logit(q[i], v[i]);
            }
          }
          for (int i = 0; i < K; ++i) {
            v[i] = B::exp(v[i]);
            vs[slot * K + i] = vs[slot * K + i] + v[i];
          }
          if (kGrad && !kSoftcap) store_acc(scratch + j, v);
        });
        s = hsum(vs, 2 * K);
        if (need_q) {
          qsum = hsum(vq, 2 * K);
          qz = hsum(vqz, 2 * K);
        }
      }
      chunk_max_[k] = m;
      chunk_sum_[k] = s;
      chunk_qsum_[k] = qsum;
      chunk_qz_[k] = qz;
      row_max = nan_max(row_max, m);
    }
    Stats st{row_max, acc_t(0), acc_t(0), acc_t(0)};
    acc_t sum = 0;
    for (int64_t k = 0; k < num_chunks_; ++k) {
      const acc_t shift = chunk_max_[k] - row_max;  // <= 0; -inf for an all -inf chunk
      sum += chunk_sum_[k] * std::exp(shift);
      if (need_q) {
        st.sum_q += chunk_qsum_[k];
        st.qz += chunk_qsum_[k] != acc_t(0) ? chunk_qz_[k] + chunk_qsum_[k] * shift : chunk_qz_[k];
      }
    }
    st.log_sum = std::log(sum);
    return st;
  }

  // Whether a chunk whose max over the non-NaN logits is -inf holds a NaN (then its max is NaN, as
  // in the reference, and so are the row's lse, loss and gradient). A rare path, element by element.
  bool chunk_has_nan(const scalar_t* z, int64_t c0, int64_t c1) const {
    for (int64_t j = c0; j < c1; ++j) {
      if (std::isnan(static_cast<acc_t>(z[j]))) return true;
    }
    return false;
  }

  // The gradient write: g = scale * ((coef * p - q) * chain) for every class, where q holds the part
  // of the target distribution beyond the class target (whose own term the caller fixes up).
  void pass_b(const scalar_t* t, scalar_t* g, acc_t lse, acc_t coef, bool need_q) {
    const Vec vscale(scale_), vlse(lse), vinv(inv_cap_), one(acc_t(1));
    const acc_t* scratch = scratch_;
    for (int64_t k = 0, c0 = 0; c0 < C_; ++k, c0 += kChunk) {
      const int64_t c1 = std::min(C_, c0 + kChunk);
      const Vec vf(kSoftcap ? coef : scale_ * coef * std::exp(chunk_max_[k] - lse));
      for_blocks(c0, c1, [&](int64_t j, int64_t n, int) XENT_LAMBDA_INLINE {
        Vec v[K], q[K];
        load_acc(scratch + j, v);
        if (need_q) load_q(t, j, n, q);
        for (int i = 0; i < K; ++i) {
          if constexpr (kSoftcap) {
            const Vec p = B::exp(v[i] - vlse);
            const Vec c = v[i] * vinv;
            Vec d = vf * p;
            if (need_q) d = d - q[i];
            v[i] = d * (one - c * c) * vscale;
          } else {
            v[i] = v[i] * vf;
            if (need_q) v[i] = v[i] - q[i] * vscale;
          }
        }
        store_grad(g + j, n, v);
      });
    }
  }

  // A row whose max is +-inf: max-shifted, as the reference computes it, every term is inf - inf.
  void nan_row(scalar_t* g, int64_t i) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    row_loss_[i] = nan;
    lse_[i] = nan;
    if constexpr (kGrad) std::fill(g, g + C_, static_cast<scalar_t>(nan));
  }

  void class_row(int64_t i) {
    const scalar_t* z = logits_ + i * C_;
    scalar_t* g = kGrad ? grad_ + i * C_ : nullptr;
    const int64_t y = target_[i];
    if (y == ignore_index_) {  // counts for nothing, whatever its logits hold: not even read
      row_loss_[i] = 0;
      lse_[i] = 0;
      if constexpr (kGrad) std::memset(static_cast<void*>(g), 0, static_cast<size_t>(C_) * sizeof(scalar_t));
      return;
    }
    const acc_t wy = weight_ != nullptr ? weight_[y] : acc_t(1);
    const HardTargetCoef<acc_t> tc = hard_target_coef(eps_, wy, weight_total_, C_);
    const bool smoothing = tc.smooth != acc_t(0);
    const acc_t zc_y = capped(static_cast<acc_t>(z[y]));  // before an in-place gradient overwrites it
    const Stats st = pass_a(z, nullptr, smoothing);
    if (!kSoftcap && std::isinf(st.max)) return nan_row(g, i);
    const acc_t lse = st.max + st.log_sum;
    const acc_t qz = weighted_logit(tc.target_q, zc_y - st.max) + (smoothing ? st.qz : acc_t(0));
    row_loss_[i] = row_loss_shifted(st.log_sum, lse, tc.sum_q, qz, z_loss_);
    lse_[i] = lse;
    if constexpr (kGrad) {
      const acc_t coef = softmax_coef(lse, tc.sum_q, z_loss_);
      pass_b(nullptr, g, lse, coef, smoothing);
      // The target's own term, from the exact p_y rather than a difference of rounded values.
      const acc_t q_y = tc.target_q + tc.smooth * wy;
      g[y] = static_cast<scalar_t>(softmax_grad(coef, std::exp(zc_y - lse), q_y) * softcap_chain(zc_y, cap_) *
                                   scale_);
    }
  }

  void prob_row(int64_t i) {
    const scalar_t* z = logits_ + i * C_;
    const scalar_t* t = prob_ + i * C_;
    scalar_t* g = kGrad ? grad_ + i * C_ : nullptr;
    const Stats st = pass_a(z, t, true);
    if (!kSoftcap && std::isinf(st.max)) return nan_row(g, i);
    const acc_t lse = st.max + st.log_sum;
    row_loss_[i] = row_loss_shifted(st.log_sum, lse, st.sum_q, st.qz, z_loss_);
    lse_[i] = lse;
    if constexpr (kGrad) pass_b(t, g, lse, softmax_coef(lse, st.sum_q, z_loss_), true);
  }

  const int64_t C_;
  const scalar_t* logits_;
  scalar_t* grad_;
  const int64_t* target_;
  const scalar_t* prob_;
  const acc_t* weight_;
  acc_t* row_loss_;
  acc_t* lse_;
  const int64_t ignore_index_;
  const acc_t eps_, smooth_, z_loss_, cap_, inv_cap_, scale_, weight_total_;
  const int64_t num_chunks_, padded_;
  acc_t* scratch_ = nullptr;    // (padded_,) exponentials, or capped logits with a softcap
  acc_t* chunk_max_ = nullptr;  // (num_chunks_,)
  acc_t* chunk_sum_ = nullptr;  // (num_chunks_,) sum of exp(zc - chunk max)
  acc_t* chunk_qsum_ = nullptr; // (num_chunks_,) sum of q over the chunk
  acc_t* chunk_qz_ = nullptr;   // (num_chunks_,) sum of q (zc - chunk max) over the chunk
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace torch_xent
