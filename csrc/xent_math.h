// The per-row mathematics shared by the CPU and CUDA kernels (torch_xent/reference.py is the oracle,
// docs/gradient.md the derivation). Only scalar formulas live here; each backend keeps its own
// memory-access strategy (vectorised rows on the CPU, warps and blocks on the GPU).
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

// For a class-index row with target weight wy, smoothing eps, class count C and total class weight W,
// the target distribution is q_j = target_q * [j == y] + smooth * w_j, whose sum is sum_q.
template <typename acc_t>
struct HardTargetCoef {
  acc_t target_q;
  acc_t smooth;
  acc_t sum_q;
};

template <typename acc_t>
XENT_HOST_DEVICE HardTargetCoef<acc_t> hard_target_coef(acc_t eps, acc_t wy, acc_t weight_total, int64_t num_classes) {
  HardTargetCoef<acc_t> c;
  c.target_q = (acc_t(1) - eps) * wy;
  c.smooth = eps / static_cast<acc_t>(num_classes);
  c.sum_q = c.target_q + c.smooth * weight_total;
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

// q * z where q == 0 counts as 0 even for z = -inf (a class the model rules out).
template <typename acc_t>
XENT_HOST_DEVICE acc_t weighted_logit(acc_t q, acc_t z) {
  return q == acc_t(0) ? acc_t(0) : q * z;
}

// loss = sum_q * lse - sum_j q_j zc_j + z_loss * lse^2, given sum_j q_j zc_j.
// Prefer row_loss_shifted: this form loses digits for logits of large magnitude (1e4 in float32).
template <typename acc_t>
XENT_HOST_DEVICE acc_t row_loss(acc_t lse, acc_t sum_q, acc_t q_dot_z, acc_t z_loss) {
  acc_t loss = sum_q * lse - q_dot_z;
  if (z_loss != acc_t(0)) loss += z_loss * lse * lse;
  return loss;
}

// The same loss computed relative to the row max m, as PyTorch's log_softmax does, so that logits of
// magnitude 1e4 stay exact: loss = sum_q * log_sum - sum_j q_j (zc_j - m) + z_loss * lse^2, where
// log_sum = log(sum_j exp(zc_j - m)) and lse = m + log_sum.
template <typename acc_t>
XENT_HOST_DEVICE acc_t row_loss_shifted(acc_t log_sum, acc_t lse, acc_t sum_q, acc_t q_dot_shifted_z, acc_t z_loss) {
  acc_t loss = sum_q * log_sum - q_dot_shifted_z;
  if (z_loss != acc_t(0)) loss += z_loss * lse * lse;
  return loss;
}

// grad_j = scale * (coef * p_j - q_j) * chain_j, with coef = sum_q + 2 * z_loss * lse.
template <typename acc_t>
XENT_HOST_DEVICE acc_t softmax_coef(acc_t lse, acc_t sum_q, acc_t z_loss) {
  return z_loss != acc_t(0) ? sum_q + acc_t(2) * z_loss * lse : sum_q;
}

}  // namespace torch_xent
