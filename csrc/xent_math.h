// The per-row mathematics shared by the CPU and CUDA kernels (torch_xent/reference.py is the oracle,
// docs/gradient.md the derivation). Only formulas live here; each backend keeps its own
// memory-access strategy (vectorised rows on the CPU, warps and blocks on the GPU).
//
// The formulas are written once for two kinds of value: V is a per-row value, either a scalar acc_t
// (one row at a time: the CPU row kernel, the CUDA kernels) or a vector of acc_t lanes, one row per
// lane (the CPU few-classes kernel, with ATen's Vectorized<acc_t>, whose constructor broadcasts a
// scalar); the options, the same for every row, stay scalar acc_t.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define XENT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define XENT_HOST_DEVICE inline
#endif

namespace torch_xent {

enum Reduction : int64_t { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

// max that propagates NaN from either side, as torch.max does (fmax would drop it and hide a NaN row).
// Written without std::isnan so that it is the same expression on the host and on the device.
template <typename acc_t>
XENT_HOST_DEVICE acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// For a class-index row with target weight wy, smoothing eps, class count C and total class weight W,
// the target distribution is q_j = target_q * [j == y] + smooth * w_j, whose sum is sum_q.
template <typename V, typename acc_t = V>
struct HardTargetCoef {
  V target_q;
  acc_t smooth;
  V sum_q;
};

template <typename V, typename acc_t>
XENT_HOST_DEVICE HardTargetCoef<V, acc_t> hard_target_coef(acc_t eps, V wy, acc_t weight_total,
                                                           int64_t num_classes) {
  HardTargetCoef<V, acc_t> c;
  c.target_q = V(acc_t(1) - eps) * wy;
  c.smooth = eps / static_cast<acc_t>(num_classes);
  c.sum_q = c.target_q + V(c.smooth * weight_total);
  return c;
}

// softcap(z) = cap * tanh(z / cap); cap == 0 means off.
template <typename acc_t>
XENT_HOST_DEVICE acc_t softcap_value(acc_t z, acc_t cap) {
  return cap > acc_t(0) ? cap * ::tanh(z / cap) : z;
}

// d softcap(z) / dz expressed through the capped value zc: 1 - (zc / cap)^2.
template <typename acc_t>
XENT_HOST_DEVICE acc_t softcap_chain(acc_t zc, acc_t cap) {
  if (!(cap > acc_t(0))) return acc_t(1);
  const acc_t t = zc / cap;
  return acc_t(1) - t * t;
}

// q * z where q == 0 counts as 0 even for z = -inf (a class the model rules out). The CPU's vector
// form (a lane select) is the overload of the same name in cpu/xent_vec.h.
template <typename acc_t>
XENT_HOST_DEVICE acc_t weighted_logit(acc_t q, acc_t z) {
  return q == acc_t(0) ? acc_t(0) : q * z;
}

// The row's loss relative to its max m, as PyTorch's log_softmax computes it, so that logits of
// magnitude 1e4 stay exact (sum_q * lse - sum_j q_j zc_j would lose their digits in float32):
// loss = sum_q * log_sum - sum_j q_j (zc_j - m) + z_loss * lse^2, where
// log_sum = log(sum_j exp(zc_j - m)) and lse = m + log_sum.
template <typename V, typename acc_t>
XENT_HOST_DEVICE V row_loss_shifted(V log_sum, V lse, V sum_q, V q_dot_shifted_z, acc_t z_loss) {
  V loss = sum_q * log_sum - q_dot_shifted_z;
  if (z_loss != acc_t(0)) loss = loss + V(z_loss) * lse * lse;
  return loss;
}

// grad_j = scale * softmax_grad(coef, p_j, q_j) * chain_j, with coef = sum_q + 2 * z_loss * lse.
template <typename V, typename acc_t>
XENT_HOST_DEVICE V softmax_coef(V lse, V sum_q, acc_t z_loss) {
  return z_loss != acc_t(0) ? sum_q + V(acc_t(2) * z_loss) * lse : sum_q;
}

// d loss / d zc_j before the reduction's scale and the softcap's chain factor.
template <typename V>
XENT_HOST_DEVICE V softmax_grad(V coef, V p, V q) {
  return coef * p - q;
}

}  // namespace torch_xent
