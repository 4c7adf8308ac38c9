// The CPU kernel for few classes (compiled once per instruction set, see xent_rows.h).
//
// Few classes (iris has 3): a row is shorter than one vector, and RowKernel's per-row work
// (horizontal reductions, scalar exp and log, partial blocks) would cost more than the row itself.
// Here a group of Vec::size() rows is transposed into a (C, rows) buffer and every step is one vector
// operation across the group's rows, one row per lane: the formulas of xent_math.h evaluated on
// vectors. Class targets without softcap; the rest goes to RowKernel.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/xent_cpu.h"
#include "cpu/xent_vec.h"
#include "xent_math.h"

namespace torch_xent {
namespace cpu {
namespace CPU_CAPABILITY {

constexpr int64_t kSmallClasses = 16;

template <typename scalar_t, bool kGrad>
class SmallClassKernel {
  using acc_t = typename Block<scalar_t>::acc_t;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t L = Vec::size();

 public:
  explicit SmallClassKernel(const RowsArgs& a)
      : C_(a.classes),
        logits_(static_cast<const scalar_t*>(a.logits)),
        grad_(static_cast<scalar_t*>(a.grad)),
        target_(a.target),
        weight_(static_cast<const acc_t*>(a.weight)),
        row_loss_(static_cast<acc_t*>(a.row_loss)),
        lse_(static_cast<acc_t*>(a.lse)),
        ignore_index_(a.ignore_index),
        eps_(static_cast<acc_t>(a.label_smoothing)),
        z_loss_(static_cast<acc_t>(a.z_loss)),
        scale_(static_cast<acc_t>(a.grad_scale)),
        weight_total_(static_cast<acc_t>(a.weight_total)) {}

  void run(int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += L) group(r0, std::min(L, end - r0));
  }

 private:
  acc_t class_weight(int64_t j) const { return weight_ != nullptr ? weight_[j] : acc_t(1); }

  void group(int64_t r0, int64_t n) {
    alignas(64) acc_t x[kSmallClasses][L];  // x[j][r]: class j of row r0 + r
    alignas(64) acc_t ys[L], wys[L], zys[L], valids[L], out[L];
    const scalar_t* z = logits_ + r0 * C_;
    for (int64_t r = 0; r < L; ++r) {
      const bool row = r < n;
      const int64_t y = row ? target_[r0 + r] : ignore_index_;
      const bool valid = row && y != ignore_index_;
      const int64_t yc = valid ? y : 0;  // ignored rows may hold any index: never use theirs
      for (int64_t j = 0; j < C_; ++j) x[j][r] = row ? static_cast<acc_t>(z[r * C_ + j]) : acc_t(0);
      ys[r] = static_cast<acc_t>(yc);
      wys[r] = valid ? class_weight(yc) : acc_t(0);
      zys[r] = x[yc][r];
      valids[r] = valid ? acc_t(1) : acc_t(0);
    }
    const Vec zero(acc_t(0));
    const Vec valid = Vec::loadu(valids) != zero;
    Vec m = Vec::loadu(x[0]);
    for (int64_t j = 1; j < C_; ++j) m = at::vec::maximum(m, Vec::loadu(x[j]));
    const HardTargetCoef<Vec, acc_t> tc = hard_target_coef(eps_, Vec::loadu(wys), weight_total_, C_);
    const bool smoothing = tc.smooth != acc_t(0);
    // wz: sum_j w_j (z_j - max), the smoothing part of the target terms before its factor eps / C.
    Vec s = zero, wz = zero;
    for (int64_t j = 0; j < C_; ++j) {
      const Vec d = Vec::loadu(x[j]) - m;
      if (smoothing) wz = wz + weighted_logit(Vec(class_weight(j)), d);
      const Vec e = vexp(d);
      s = s + e;
      e.store(x[j]);
    }
    // As in the reference, a row whose max is +-inf is NaN throughout (inf - inf on the way).
    const Vec log_sum = s.log();
    const Vec lse = m + log_sum;
    Vec qz = weighted_logit(tc.target_q, Vec::loadu(zys) - m);
    if (smoothing) qz = qz + Vec(tc.smooth) * wz;
    const Vec loss = row_loss_shifted(log_sum, lse, tc.sum_q, qz, z_loss_);
    Vec::blendv(zero, loss, valid).store(out);
    for (int64_t r = 0; r < n; ++r) row_loss_[r0 + r] = out[r];
    Vec::blendv(zero, lse, valid).store(out);
    for (int64_t r = 0; r < n; ++r) lse_[r0 + r] = out[r];
    if constexpr (kGrad) {
      const Vec coef = softmax_coef(lse, tc.sum_q, z_loss_);
      const Vec inv_s = Vec(acc_t(1)) / s, y = Vec::loadu(ys), vscale(scale_);
      for (int64_t j = 0; j < C_; ++j) {
        Vec q = Vec::blendv(zero, tc.target_q, y == Vec(static_cast<acc_t>(j)));
        if (smoothing) q = q + Vec(tc.smooth * class_weight(j));
        const Vec g = softmax_grad(coef, Vec::loadu(x[j]) * inv_s, q) * vscale;
        Vec::blendv(zero, g, valid).store(x[j]);  // ignored rows: exactly 0, whatever their logits
      }
      scalar_t* g = grad_ + r0 * C_;
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t j = 0; j < C_; ++j) g[r * C_ + j] = static_cast<scalar_t>(x[j][r]);
      }
    }
  }

  const int64_t C_;
  const scalar_t* logits_;
  scalar_t* grad_;
  const int64_t* target_;
  const acc_t* weight_;
  acc_t* row_loss_;
  acc_t* lse_;
  const int64_t ignore_index_;
  const acc_t eps_, z_loss_, scale_, weight_total_;
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace torch_xent
