// The CPU kernel for K-dimensional input in its own layout (compiled once per instruction set, see
// xent_rows.h): logits (N, C, S) with S = d1 * ... * dK contiguous, as a segmentation model's
// (N, C, H, W) output is laid out. The classes of one position are S elements apart and the
// positions of one class are contiguous, so the vectors run across positions and the classes are
// the inner loop, the formulas of xent_math.h evaluated one position per lane.
//
// A tile is kPositionTile consecutive positions of one batch item. Per tile: a first loop over the
// classes takes each position's max (reading the tile's logits from memory, prefetching the next
// tiles' logits and targets, and keeping half-precision or capped logits in acc_t in a per-thread
// scratch of C x tile values); the target's logit and weight of each position are then gathered; a
// second loop sums exp(zc - max) and the target terms (from cache), in blocks of
// classes, and keeps the exponentials in the scratch; a third writes the gradient in the logits'
// layout: e_j times one factor per position for every class, then the targets' entries. One exp per
// element (two with a softcap), one read of the logits from memory and one write of the gradient.
// Every position is computed by itself, lane-wise, so the result does not depend on how the tiles
// are split over the threads; a reduced loss is summed per tile (no per-position buffer) and the
// tiles' sums are added in order.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
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
class PositionKernel {
  using B = Block<scalar_t>;
  using acc_t = typename B::acc_t;
  using Vec = typename B::Vec;
  static constexpr int K = B::kVecs;
  static constexpr int64_t kS = B::kSize;            // elements per block
  static constexpr int64_t kVS = Vec::size();        // elements per acc_t vector
  static constexpr int64_t T = kPositionTile;        // positions per tile
  static constexpr int kBlocks = static_cast<int>(T / kS);
  static constexpr int NV = static_cast<int>(T / kVS);  // acc_t vectors per tile
  static_assert(T % kS == 0 && kBlocks * K == NV, "a tile is a whole number of blocks");
  // Prefetch distance, in tiles, of the first pass (the classes of a tile are C streams of T
  // elements, too many for the hardware prefetchers to follow when C is large).
  static constexpr int64_t kPrefetchTiles = 2;
  // Pass 1 keeps the (capped) logits in acc_t in the scratch, for pass 2 and the targets' pick: with
  // a softcap (computed once) and for half-precision logits (converted once).
  static constexpr bool kStage = kSoftcap || !std::is_same<scalar_t, acc_t>::value;
  static constexpr int64_t kSumBlock = 16;  // classes per innermost partial sum
  static constexpr int kLogTile = 6;
  static_assert(T == int64_t(1) << kLogTile, "kLogTile is log2 of the tile");

 public:
  explicit PositionKernel(const RowsArgs& a)
      : C_(a.classes),
        S_(a.positions),
        logits_(static_cast<const scalar_t*>(a.logits)),
        grad_(static_cast<scalar_t*>(a.grad)),
        target_(a.target),
        prob_(static_cast<const scalar_t*>(a.target_prob)),
        weight_(static_cast<const acc_t*>(a.weight)),
        row_loss_(static_cast<acc_t*>(a.row_loss)),
        lse_(static_cast<acc_t*>(a.lse)),
        tile_loss_(a.tile_loss),
        ignore_index_(a.ignore_index),
        eps_(static_cast<acc_t>(a.label_smoothing)),
        smooth_(static_cast<acc_t>(a.label_smoothing / static_cast<double>(a.classes))),
        z_loss_(static_cast<acc_t>(a.z_loss)),
        cap_(static_cast<acc_t>(a.softcap)),
        inv_cap_(a.softcap > 0 ? static_cast<acc_t>(1.0 / a.softcap) : acc_t(0)),
        scale_(static_cast<acc_t>(a.grad_scale)),
        weight_total_(static_cast<acc_t>(a.weight_total)),
        tiles_per_item_((a.positions + T - 1) / T) {}

  // Tiles [begin, end) of the problem; tile t is positions [s0, s0 + T) of batch item t / tiles_per_item.
  void run(int64_t begin, int64_t end) {
    if (kGrad || kStage) {
      scratch_ = static_cast<acc_t*>(thread_scratch(static_cast<size_t>(C_ * T) * sizeof(acc_t)));
    }
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles_per_item_;
      const int64_t s0 = (t % tiles_per_item_) * T;
      tile(t, n, s0, std::min(T, S_ - s0));
    }
  }

 private:
  acc_t class_weight(int64_t j) const { return weight_ != nullptr ? weight_[j] : acc_t(1); }

  // The tile's positions of one class (npos valid, 0 in the lanes past them).
  static XENT_INLINE void load_tile(const scalar_t* p, int64_t npos, Vec* v) {
    for (int b = 0; b < kBlocks; ++b) {
      const int64_t n = npos - b * kS;
      if (n >= kS) {
        B::load(p + b * kS, v + b * K);
      } else if (n > 0) {
        scalar_t tmp[kS];
        for (int64_t k = 0; k < kS; ++k) tmp[k] = k < n ? p[b * kS + k] : scalar_t(0);
        B::load(tmp, v + b * K);
      } else {
        for (int i = 0; i < K; ++i) v[b * K + i] = Vec(acc_t(0));
      }
    }
  }
  static XENT_INLINE void store_tile(scalar_t* p, int64_t npos, const Vec* v) {
    for (int b = 0; b < kBlocks; ++b) {
      const int64_t n = npos - b * kS;
      if (n >= kS) {
        B::store(p + b * kS, v + b * K);
      } else if (n > 0) {
        scalar_t tmp[kS];
        B::store(tmp, v + b * K);
        for (int64_t k = 0; k < n; ++k) p[b * kS + k] = tmp[k];
      }
    }
  }
  static XENT_INLINE void load_acc(const acc_t* p, Vec* v) {
    for (int i = 0; i < NV; ++i) v[i] = Vec::loadu(p + i * kVS);
  }
  static XENT_INLINE void store_acc(acc_t* p, const Vec* v) {
    for (int i = 0; i < NV; ++i) v[i].store(p + i * kVS);
  }
  // The per-position steps below touch each of the tile's T positions once, where the class loops
  // touch each of its C x T elements: with few classes (19 for Cityscapes) they would be half of the
  // tile's time as scalar loops, hence their AVX-512 forms (8 positions an instruction). Each gives
  // the same values as its scalar loop.

  // A tile's class targets y[0, npos): ys[r] = y as acc_t, or -1 where it is ignore_index or r >= npos
  // (so that no class matches it), yi[r] = y, or 0 there (the targets were checked to be in range).
  // Returns whether any position counts.
  static XENT_INLINE bool tile_targets(const int64_t* y, int64_t npos, int64_t ignore_index, acc_t* ys, int64_t* yi) {
#if defined(CPU_CAPABILITY_AVX512)
    if (npos == T) {
      const __m512i vignore = _mm512_set1_epi64(ignore_index);
      __mmask8 any = 0;
      for (int64_t r = 0; r < T; r += 8) {
        const __m512i t = _mm512_loadu_si512(y + r);
        const __mmask8 valid = _mm512_cmpneq_epi64_mask(t, vignore);
        any |= valid;
        _mm512_store_si512(yi + r, _mm512_maskz_mov_epi64(valid, t));
        if constexpr (std::is_same<acc_t, float>::value) {
          _mm256_store_ps(ys + r, _mm256_mask_mov_ps(_mm256_set1_ps(-1.0f), valid, _mm512_cvtepi64_ps(t)));
        } else {
          _mm512_store_pd(ys + r, _mm512_mask_mov_pd(_mm512_set1_pd(-1.0), valid, _mm512_cvtepi64_pd(t)));
        }
      }
      return any != 0;
    }
#endif
    bool any = false;
    for (int64_t r = 0; r < npos; ++r) {
      // Without branches: ignored positions are scattered, a branch on them is mispredicted.
      const int64_t t = y[r];
      const bool valid = t != ignore_index;
      any |= valid;
      ys[r] = static_cast<acc_t>(valid ? t : int64_t(-1));
      yi[r] = valid ? t : int64_t(0);
    }
    for (int64_t r = npos; r < T; ++r) {
      ys[r] = acc_t(-1);
      yi[r] = 0;
    }
    return any;
  }

  // out[r] = base[yi[r] * stride + r * step] for r in [0, T), base in acc_t.
  static XENT_INLINE void gather(const acc_t* base, int64_t stride, int64_t step, const int64_t* yi, acc_t* out) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i vstride = _mm512_set1_epi64(stride);
    const __m512i lanes = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(step));
    for (int64_t r = 0; r < T; r += 8) {
      const __m512i idx = _mm512_add_epi64(_mm512_add_epi64(_mm512_mullo_epi64(_mm512_load_si512(yi + r), vstride), lanes),
                                           _mm512_set1_epi64(r * step));
      if constexpr (std::is_same<acc_t, float>::value) {
        _mm256_store_ps(out + r, _mm512_i64gather_ps(idx, base, 4));
      } else {
        _mm512_store_pd(out + r, _mm512_i64gather_pd(idx, base, 8));
      }
    }
#else
    for (int64_t r = 0; r < T; ++r) out[r] = base[yi[r] * stride + r * step];
#endif
  }

  // scratch[yi[r] * T + r] = in[r] for r in [0, T): one entry of each position's column.
  static XENT_INLINE void scatter(const acc_t* in, const int64_t* yi, acc_t* scratch) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t r = 0; r < T; r += 8) {
      const __m512i idx = _mm512_add_epi64(_mm512_slli_epi64(_mm512_load_si512(yi + r), kLogTile),
                                           _mm512_add_epi64(lanes, _mm512_set1_epi64(r)));
      if constexpr (std::is_same<acc_t, float>::value) {
        _mm512_i64scatter_ps(scratch, idx, _mm256_load_ps(in + r), 4);
      } else {
        _mm512_i64scatter_pd(scratch, idx, _mm512_load_pd(in + r), 8);
      }
    }
#else
    for (int64_t r = 0; r < T; ++r) scratch[yi[r] * T + r] = in[r];
#endif
  }

  // Probability targets: q = w_j ((1 - eps) t + eps / C) for the tile's positions of class j.
  XENT_INLINE void load_q(const scalar_t* t, int64_t npos, acc_t w, Vec* q) const {
    load_tile(t, npos, q);
    const Vec a(acc_t(1) - eps_), b(smooth_), vw(w);
    for (int i = 0; i < NV; ++i) q[i] = at::vec::fmadd(q[i], a, b) * vw;
  }

  // The per-position outputs of a tile: the loss, or (without row_loss) its sum over the tile in
  // double, in position order; the lse unless it is not wanted.
  XENT_INLINE void write_outputs(int64_t t, int64_t out, int64_t npos, const acc_t* loss, const acc_t* lse) {
    if (row_loss_ != nullptr) {
      for (int64_t r = 0; r < npos; ++r) row_loss_[out + r] = loss[r];
    } else {
      // Eight independent sums (one dependent chain of 64 double additions would cost a tenth of
      // the tile), combined in a fixed order.
      alignas(64) double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t r = 0;
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same<acc_t, float>::value) {  // lane k: part[k], the same additions in order
        __m512d sum = _mm512_setzero_pd();
        for (; r + 8 <= npos; r += 8) sum = _mm512_add_pd(sum, _mm512_cvtps_pd(_mm256_loadu_ps(loss + r)));
        _mm512_store_pd(part, sum);
      }
#endif
      for (; r < npos; ++r) part[r % 8] += static_cast<double>(loss[r]);
      tile_loss_[t] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    }
    if (lse_ != nullptr) {
      for (int64_t r = 0; r < npos; ++r) lse_[out + r] = lse[r];
    }
  }

  // Tile t: the positions [s0, s0 + npos) of batch item n.
  void tile(int64_t t_index, int64_t n, int64_t s0, int64_t npos) {
    const int64_t base = n * C_ * S_ + s0;  // element (n, 0, s0)
    const scalar_t* z = logits_ + base;
    const scalar_t* t = kProb ? prob_ + base : nullptr;
    scalar_t* g = kGrad ? grad_ + base : nullptr;
    const int64_t out = n * S_ + s0;  // the positions' index in the (N, S) outputs
    acc_t* scratch = scratch_;

    // Class targets: each position's class as acc_t, or -1 where it is ignored or past npos (so that
    // no class matches it), and as an index, 0 there (the targets were checked to be in range). A tile
    // where nothing counts is not even read, like an ignored row.
    alignas(64) acc_t ys[T];
    alignas(64) int64_t yi[T];
    if constexpr (!kProb) {
      // The targets are one more stream next to the C of the logits: prefetched like them.
      if (s0 + kPrefetchTiles * T < S_) {
        const char* ahead = reinterpret_cast<const char*>(target_ + out + kPrefetchTiles * T);
        for (int64_t off = 0; off < T * int64_t(sizeof(int64_t)); off += 64) __builtin_prefetch(ahead + off);
      }
      const bool any_valid = tile_targets(target_ + out, npos, ignore_index_, ys, yi);
      if (!any_valid) {
        alignas(64) acc_t zeros[T] = {};
        write_outputs(t_index, out, npos, zeros, zeros);
        if constexpr (kGrad) {
          for (int64_t j = 0; j < C_; ++j) {
            std::memset(static_cast<void*>(g + j * S_), 0, static_cast<size_t>(npos) * sizeof(scalar_t));
          }
        }
        return;
      }
    }

    // Pass 1: the max of the (capped) logits of each position, kept in acc_t in the scratch where
    // kStage says so (read here, before an in-place gradient overwrites them).
    Vec m[NV];
    for (int i = 0; i < NV; ++i) m[i] = Vec(-std::numeric_limits<acc_t>::infinity());
    const bool weighted = weight_ != nullptr;
    const bool prefetch = s0 + kPrefetchTiles * T < S_;
    for (int64_t j = 0; j < C_; ++j) {
      const scalar_t* zj = z + j * S_;
      if (prefetch) {
        const char* ahead = reinterpret_cast<const char*>(zj + kPrefetchTiles * T);
        for (int64_t off = 0; off < T * int64_t(sizeof(scalar_t)); off += 64) __builtin_prefetch(ahead + off);
      }
      Vec v[NV];
      load_tile(zj, npos, v);
      if constexpr (kSoftcap) {
        for (int i = 0; i < NV; ++i) v[i] = Vec(cap_) * (v[i] * Vec(inv_cap_)).tanh();
      }
      if constexpr (kStage) store_acc(scratch + j * T, v);
      // A NaN logit need not reach the max: exp(NaN - max) makes the position's sum, and from there
      // everything of that position, NaN.
      for (int i = 0; i < NV; ++i) m[i] = max_skip_nan(m[i], v[i]);
    }

    // Class targets: the target's (capped) logit and weight of each position, gathered from the tile
    // just read (in cache), where a pick lane by lane would cost two vector operations per class.
    Vec yv[NV], zy[NV], wy[NV], valid[NV];
    if constexpr (!kProb) {
      alignas(64) acc_t pick[T];
      if constexpr (kStage) {
        gather(scratch, T, 1, yi, pick);  // 0 past npos (yi = 0 there: the zeros load_tile put in row 0)
      } else {
        // Past npos, yi = 0: row 0 of the tile, whose elements past npos are other positions' (or, in
        // the last tile, past the logits): those lanes only are read one by one.
        if (npos == T) {
          gather(reinterpret_cast<const acc_t*>(z), S_, 1, yi, pick);
        } else {
          for (int64_t r = 0; r < npos; ++r) pick[r] = static_cast<acc_t>(z[yi[r] * S_ + r]);
          for (int64_t r = npos; r < T; ++r) pick[r] = acc_t(0);
        }
      }
      load_acc(pick, zy);
      if (weighted) {
        gather(weight_, 1, 0, yi, pick);  // weight[0] where a position does not count
        load_acc(pick, wy);
      }
      for (int i = 0; i < NV; ++i) {
        yv[i] = Vec::loadu(ys + i * kVS);
        valid[i] = yv[i] >= Vec(acc_t(0));
        // The weight where the position counts (without class weights 1), else 0.
        wy[i] = Vec::blendv(Vec(acc_t(0)), weighted ? wy[i] : Vec(acc_t(1)), valid[i]);
      }
    }

    // Pass 2: sum_j exp(zc_j - max), and the target terms relative to the max. Each sum runs in
    // three levels (16 classes, 256 classes, all), so that C terms added in acc_t err like about
    // 16 + 16 + C / 256 additions rather than C.
    const bool smoothing = !kProb && smooth_ != acc_t(0);
    Vec s[NV], qz[NV], qsum[NV];
    for (int i = 0; i < NV; ++i) s[i] = qz[i] = qsum[i] = Vec(acc_t(0));
    for (int64_t j2 = 0; j2 < C_; j2 += kSumBlock * kSumBlock) {
      const int64_t e2 = std::min(C_, j2 + kSumBlock * kSumBlock);
      Vec s1[NV], qz1[NV], qsum1[NV];
      for (int i = 0; i < NV; ++i) s1[i] = qz1[i] = qsum1[i] = Vec(acc_t(0));
      for (int64_t j1 = j2; j1 < e2; j1 += kSumBlock) {
        const int64_t e1 = std::min(e2, j1 + kSumBlock);
        Vec s0[NV], qz0[NV], qsum0[NV];
        for (int i = 0; i < NV; ++i) s0[i] = qz0[i] = qsum0[i] = Vec(acc_t(0));
        for (int64_t j = j1; j < e1; ++j) {
          Vec v[NV];
          if constexpr (kStage) {
            load_acc(scratch + j * T, v);
          } else {
            load_tile(z + j * S_, npos, v);
          }
          for (int i = 0; i < NV; ++i) v[i] = v[i] - m[i];
          if constexpr (kProb) {
            Vec q[NV];
            load_q(t + j * S_, npos, class_weight(j), q);
            for (int i = 0; i < NV; ++i) {
              qsum0[i] = qsum0[i] + q[i];
              qz0[i] = qz0[i] + weighted_logit(q[i], v[i]);
            }
          } else if (smoothing) {  // sum_j w_j (zc_j - max); its factor eps / C comes below
            const Vec w(class_weight(j));
            for (int i = 0; i < NV; ++i) qz0[i] = qz0[i] + weighted_logit(w, v[i]);
          }
          for (int i = 0; i < NV; ++i) {
            v[i] = B::exp(v[i]);
            s0[i] = s0[i] + v[i];
          }
          if (kGrad && !kSoftcap) store_acc(scratch + j * T, v);
        }
        for (int i = 0; i < NV; ++i) {
          s1[i] = s1[i] + s0[i];
          qz1[i] = qz1[i] + qz0[i];
          qsum1[i] = qsum1[i] + qsum0[i];
        }
      }
      for (int i = 0; i < NV; ++i) {
        s[i] = s[i] + s1[i];
        qz[i] = qz[i] + qz1[i];
        qsum[i] = qsum[i] + qsum1[i];
      }
    }

    // Per position: the loss, the lse and the gradient's coefficients. As in the reference, a
    // position whose max is +-inf is NaN throughout (inf - inf on the way), unless it is ignored.
    alignas(64) acc_t loss_out[T], lse_out[T];
    Vec lse[NV], coef[NV], target_q[NV];
    acc_t smooth = smooth_;
    for (int i = 0; i < NV; ++i) {
      const Vec log_sum = s[i].log();
      lse[i] = m[i] + log_sum;
      Vec sum_q, q_dot_z, loss;
      if constexpr (kProb) {
        sum_q = qsum[i];
        loss = row_loss_shifted(log_sum, lse[i], sum_q, qz[i], z_loss_);
        loss.store(loss_out + i * kVS);
        lse[i].store(lse_out + i * kVS);
      } else {
        const HardTargetCoef<Vec, acc_t> tc = hard_target_coef(eps_, wy[i], weight_total_, C_);
        smooth = tc.smooth;
        sum_q = tc.sum_q;
        target_q[i] = tc.target_q;
        q_dot_z = weighted_logit(tc.target_q, zy[i] - m[i]);
        if (smoothing) q_dot_z = q_dot_z + Vec(tc.smooth) * qz[i];
        loss = row_loss_shifted(log_sum, lse[i], sum_q, q_dot_z, z_loss_);
        Vec::blendv(Vec(acc_t(0)), loss, valid[i]).store(loss_out + i * kVS);
        Vec::blendv(Vec(acc_t(0)), lse[i], valid[i]).store(lse_out + i * kVS);
      }
      coef[i] = softmax_coef(lse[i], sum_q, z_loss_);
    }
    write_outputs(t_index, out, npos, loss_out, lse_out);
    if constexpr (!kGrad) return;

    // Pass 3: grad_j = scale * softmax_grad(coef, p_j, q_j) * chain_j, in the logits' layout.
    const Vec vscale(scale_);
    Vec f[NV];
    for (int i = 0; i < NV; ++i) {
      // Without a softcap p_j = e_j / s: the scale and 1 / s fold into one factor.
      f[i] = kSoftcap ? coef[i] : coef[i] / s[i] * vscale;
      if constexpr (!kProb) {
        target_q[i] = kSoftcap ? target_q[i] : target_q[i] * vscale;
      }
    }
    if constexpr (!kProb && !kSoftcap) {
      // Every class of a position gets e_j f, less the smoothing share, except its target, which gets
      // e_y f - q_y: writing e_y - q_y / f over e_y in the scratch first makes that one loop of a
      // multiply a class, the targets' entries included. An ignored position gets f = 0, so exactly 0
      // where its exponentials are finite (their sum is: each is at most 1). A tile with an ignored
      // position whose exponentials are not (a NaN logit, an infinite max), or with f = 0 where q_y
      // is not (a z_loss that cancels sum_q), takes the general loop below.
      const Vec zero(acc_t(0));
      Vec share[NV];
      bool clean = true;
      for (int i = 0; i < NV; ++i) {
        f[i] = Vec::blendv(zero, f[i], valid[i]);
        share[i] = target_q[i] & valid[i];
        clean &= (valid[i] | (s[i] < Vec(std::numeric_limits<acc_t>::infinity()))).zero_mask() == 0;
        clean &= ((f[i] == zero) & (share[i] != zero)).zero_mask() == (1 << kVS) - 1;
      }
      if (clean) {
        alignas(64) acc_t ey[T];
        for (int i = 0; i < NV; ++i) {
          // Pass 2's exponential (the same function of the same argument), where q_y = 0 unchanged.
          const Vec e = B::exp(zy[i] - m[i]);
          Vec::blendv(e, e - share[i] / f[i], share[i] != zero).store(ey + i * kVS);
        }
        scatter(ey, yi, scratch);  // an ignored position writes its class 0's own value back
        for (int64_t j = 0; j < C_; ++j) {
          Vec v[NV];
          load_acc(scratch + j * T, v);
          if (smoothing) {
            const Vec qs(smooth * class_weight(j) * scale_);
            for (int i = 0; i < NV; ++i) v[i] = v[i] * f[i] - (qs & valid[i]);
          } else {
            for (int i = 0; i < NV; ++i) v[i] = v[i] * f[i];
          }
          store_tile(g + j * S_, npos, v);
        }
        return;
      }
    }
    for (int64_t j = 0; j < C_; ++j) {
      Vec v[NV], q[NV];
      load_acc(scratch + j * T, v);
      if constexpr (kProb) {
        load_q(t + j * S_, npos, class_weight(j), q);
      } else {
        const acc_t qs = smoothing ? smooth * class_weight(j) * (kSoftcap ? acc_t(1) : scale_) : acc_t(0);
        const Vec vj(static_cast<acc_t>(j));
        for (int i = 0; i < NV; ++i) q[i] = Vec::blendv(Vec(qs), target_q[i] + Vec(qs), yv[i] == vj);
      }
      for (int i = 0; i < NV; ++i) {
        if constexpr (kSoftcap) {
          const Vec p = B::exp(v[i] - lse[i]);
          const Vec c = v[i] * Vec(inv_cap_);
          v[i] = softmax_grad(f[i], p, q[i]) * (Vec(acc_t(1)) - c * c) * vscale;
        } else if constexpr (kProb) {
          v[i] = v[i] * f[i] - q[i] * vscale;
        } else {
          v[i] = v[i] * f[i] - q[i];
        }
        if constexpr (!kProb) v[i] = Vec::blendv(Vec(acc_t(0)), v[i], valid[i]);  // ignored: exactly 0
      }
      store_tile(g + j * S_, npos, v);
    }
  }

  const int64_t C_, S_;
  const scalar_t* logits_;
  scalar_t* grad_;
  const int64_t* target_;
  const scalar_t* prob_;
  const acc_t* weight_;
  acc_t* row_loss_;
  acc_t* lse_;         // null: not wanted
  double* tile_loss_;  // the per-tile loss sums, where row_loss_ is null
  const int64_t ignore_index_;
  const acc_t eps_, smooth_, z_loss_, cap_, inv_cap_, scale_, weight_total_;
  const int64_t tiles_per_item_;
  acc_t* scratch_ = nullptr;  // (C, T): exponentials, or the staged (capped) logits
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace torch_xent
