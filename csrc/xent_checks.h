// The argument checks of torch_xent::cross_entropy_forward(_inplace) that do not depend on the
// device, called by both backends (cpu/xent_kernel.cpp, cuda/xent_kernel.cu) so that a bad argument
// reads the same on either. Each backend keeps only what is its own: that the logits are on its
// device, and the limits of its indexing (in-row indices are 32-bit on the GPU, 64-bit on the CPU).
//
// Where the two backends used to differ, the rules are now:
//  - Strides: the out-of-place op takes tensors of any strides and runs on contiguous copies of the
//    ones that are not (a no-op for what the Python entry points pass); the in-place op needs
//    contiguous logits, because the gradient is written into their storage as an (M, C) array and a
//    copy would leave the caller's tensor as it was.
//  - softcap: finite and >= 0, 0 being off. An infinite cap is the identity only in the limit:
//    evaluated, cap * tanh(z / cap) is inf * 0 = NaN for every logit, a silent NaN loss. The Python
//    entry points say "no cap" with None.
//  - Classes: at least one, for any number of rows (PyTorch has no softmax over an empty class
//    dimension; the Python entry points raise before they get here).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "xent_math.h"

namespace torch_xent {

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Everything about the arguments of both ops but the device of the logits. `op` names the op in the
// messages. Logits are (M, C) rows, or (N, C, S): K-dimensional input with its positions flattened
// into S, whose class targets are (N, S) (a backend may take only the first; see its own checks).
inline void check_forward_arguments(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                    const c10::optional<at::Tensor>& weight, int64_t reduction,
                                    double label_smoothing, double softcap) {
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, op, ": logits must be 2-D (M, C) or 3-D (N, C, S), got ",
              logits.dim(), " dimension(s)");
  TORCH_CHECK(is_kernel_dtype(logits.scalar_type()), op,
              ": logits must be float32, float64, bfloat16 or float16, got ", logits.scalar_type());
  const int64_t classes = logits.size(1);
  TORCH_CHECK(classes > 0, op, ": logits have 0 classes");
  TORCH_CHECK(target.device() == logits.device(), op, ": target must be on the logits' device ", logits.device(),
              ", got ", target.device());
  if (at::isFloatingType(target.scalar_type())) {
    TORCH_CHECK(target.sizes() == logits.sizes(), op, ": class-probability targets must have the logits' shape ",
                logits.sizes(), ", got ", target.sizes());
    TORCH_CHECK(target.scalar_type() == logits.scalar_type(), op, ": class-probability targets must have the "
                "logits' dtype ", logits.scalar_type(), ", got ", target.scalar_type());
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, op, ": class-index targets must be int64, got ",
                target.scalar_type());
    if (logits.dim() == 2) {
      TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op,
                  ": class-index targets must have shape (", logits.size(0), "), got ", target.sizes());
    } else {
      TORCH_CHECK(target.dim() == 2 && target.size(0) == logits.size(0) && target.size(1) == logits.size(2), op,
                  ": class-index targets must have shape (", logits.size(0), ", ", logits.size(2), "), got ",
                  target.sizes());
    }
  }
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == classes, op, ": weight must have shape (", classes,
                "), got ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == logits.scalar_type(), op, ": weight must have the logits' dtype ",
                logits.scalar_type(), ", got ", weight->scalar_type());
    TORCH_CHECK(weight->device() == logits.device(), op, ": weight must be on the logits' device ",
                logits.device(), ", got ", weight->device());
  }
  TORCH_CHECK(reduction >= kReductionNone && reduction <= kReductionSum, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), op, ": softcap must be finite and >= 0 (0 is off), got ",
              softcap);
}

// What the in-place op needs beyond that: the gradient overwrites the logits' storage.
inline void check_inplace_arguments(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous, since the gradient is written into their "
              "storage");
  TORCH_CHECK(!(at::isFloatingType(target.scalar_type()) && target.is_same(logits)), op,
              ": the target cannot be the logits themselves");
}

}  // namespace torch_xent
