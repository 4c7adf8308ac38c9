// The per-position code of the CUDA kernel for K-dimensional input in its own layout
// (csrc/cuda/xent_kernel.cu, xent_positions_kernel): logits (N, C, S) with S = d1 * ... * dK
// contiguous, as a segmentation model's (N, C, H, W) output is laid out. The classes of one position
// are S elements apart and the positions of one class are contiguous, so one thread owns one
// position and walks its classes, and the threads of a warp read 32 neighbouring positions of each
// class: every load and store of the warp is one contiguous run, without moving the classes last.
//
// A thread's work: an online max / sum-exp over the classes with the target terms (the same
// statistics and formulas as a row's, xent_rows.cuh, accumulated by one thread instead of combined
// across threads), then the gradient in the logits' layout, a second read of the position's logits
// (recently read by the same block, so mostly from L2). The in-place form reads each element before
// the same thread writes its gradient there.
//
// Like xent_rows.cuh this is valid host C++, so that csrc/cuda/emulate_rows.cpp can run it on a CPU
// thread by thread (tests/test_cuda.py) where no GPU is present.
#pragma once

#include <cstdint>
#include <limits>

#include "xent_rows.cuh"

namespace torch_xent {
namespace rows {

// Classes a thread loads before it uses the first (independent loads in flight).
constexpr int kPositionUnroll = 4;

// Position `row` = n * S + s of the (N, C, S) problem p (p.M = N * S rows, p.C classes; p.lse may
// be null, when the caller does not want it).
template <typename T, typename acc_t, int MODE>
XENT_ROW_FN void process_position(const RowParams<T, acc_t>& p, int64_t S, int64_t row) {
  constexpr int U = kPositionUnroll;
  const int C = p.C;
  const int64_t n = row / S;
  const int64_t base = n * C * S + (row - n * S);  // element (n, 0, s)
  const T* z = p.logits + base;
  const T* t = MODE == kSoft ? p.soft + base : nullptr;
  T* g = p.grad != nullptr ? p.grad + base : nullptr;
  const acc_t cap = p.cap;

  TargetTerms<acc_t> tt = target_terms<T, acc_t, MODE>(p);
  acc_t wy = acc_t(1);
  if (MODE != kSoft) {
    const int64_t y = p.target[row];
    acc_t v;
    if (skipped_row(y, p.ignore_index, C, v)) {  // the position's logits are not read
      p.row_loss[row] = v;
      if (p.lse != nullptr) p.lse[row] = v;
      if (g != nullptr) {
        for (int j = 0; j < C; ++j) g[j * S] = from_acc<T>(v);
      }
      return;
    }
    tt.y = static_cast<int>(y);
    if (p.weight != nullptr) wy = to_acc(p.weight[y]);
  }

  // Pass 1: the online max / sum-exp and the target terms, U classes at a time.
  Stats<acc_t> st = empty_stats<acc_t>();
  for (int j0 = 0; j0 < C; j0 += U) {
    acc_t zc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      zc[u] = j < C ? softcap_value(to_acc(z[j * S]), cap) : neg_inf<acc_t>();
    }
    acc_t bmax = neg_inf<acc_t>();
#pragma unroll
    for (int u = 0; u < U; ++u) bmax = nan_max(bmax, zc[u]);
    const acc_t new_m = nan_max(st.m, bmax);
    // Until a finite logit is seen every exp below is 0; shifting by 0 avoids -inf - -inf.
    const acc_t shift = ref_of(new_m);
    st.dot = rebase_dot(st.dot, st.qsum, ref_of(st.m), shift);
    acc_t s = st.s * acc_exp(st.m - shift);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j >= C) continue;
      const acc_t zs = zc[u] - shift;
      s += acc_exp(zs);
      if (MODE == kSoft) {
        acc_t q = tt.keep * to_acc(t[j * S]) + tt.uniform;
        if (p.weight != nullptr) q *= to_acc(p.weight[j]);
        st.qsum += q;
        st.dot += weighted_logit(q, zs);
      } else {
        if (j == tt.y) st.zy = zc[u];
        if (MODE == kHardWeighted) {
          const acc_t w = to_acc(p.weight[j]);
          st.qsum += w;
          st.dot += weighted_logit(w, zs);
        } else if (tt.smooth_on) {
          st.qsum += acc_t(1);
          st.dot += zs;
        }
      }
    }
    st.s = s;
    st.m = new_m;
  }

  acc_t loss, lse;
  RowResult<acc_t> r = finish_row<acc_t, MODE>(st, tt, wy, C, p.eps, p.z_loss, loss, lse);
  p.row_loss[row] = loss;
  if (p.lse != nullptr) p.lse[row] = lse;
  if (g == nullptr) return;

  // Pass 2: grad_j = scale * (coef * exp(zc_j - lse) - q_j) * chain_j, U classes at a time.
  scale_result(r, p.scale_ptr != nullptr ? *p.scale_ptr : p.scale);
  for (int j0 = 0; j0 < C; j0 += U) {
    acc_t zc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      zc[u] = j < C ? softcap_value(to_acc(z[j * S]), cap) : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (j >= C) continue;
      acc_t q;
      if (MODE == kSoft) {
        q = tt.keep * to_acc(t[j * S]) + tt.uniform;
        if (p.weight != nullptr) q *= to_acc(p.weight[j]);
        q *= r.scale;
      } else {
        q = j == tt.y ? r.target_q : acc_t(0);
        if (MODE == kHardWeighted) {
          q += r.smooth * to_acc(p.weight[j]);
        } else if (tt.smooth_on) {
          q += r.smooth;
        }
      }
      acc_t grad = softmax_grad(r.coef, acc_exp((zc[u] - r.ref) - r.log_sum), q);
      if (cap > acc_t(0)) grad *= softcap_chain(zc[u], cap);
      g[j * S] = from_acc<T>(grad);
    }
  }
}

}  // namespace rows
}  // namespace torch_xent
