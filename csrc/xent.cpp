// Op schemas for torch_xent: the single place where the custom ops are declared.
// Kernels live in cpu/xent_kernel.cpp and cuda/xent_kernel.cu, each with its own TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/xent_cpu.h"

namespace torch_xent {

int64_t cuda_version() {
#ifdef TORCH_XENT_WITH_CUDA
  return TORCH_XENT_WITH_CUDA;
#else
  return -1;
#endif
}

// Device-agnostic: one multiply (broadcast per row for `none`).
// grad is (M, C) with grad_output () or (M,), or (N, C, S) with grad_output () or (N, S).
at::Tensor cross_entropy_backward(const at::Tensor& grad, const at::Tensor& grad_output) {
  const bool per_row = grad_output.dim() > 0;
  TORCH_CHECK(!per_row || (grad.dim() == grad_output.dim() + 1 && grad.size(0) == grad_output.size(0) &&
                           (grad.dim() == 2 || grad.size(2) == grad_output.size(1))),
              "cross_entropy_backward: grad_output must be 0-d or hold one value per row");
  if (per_row) return grad * grad_output.unsqueeze(1).to(grad.scalar_type());
  return grad * grad_output.to(grad.scalar_type());
}

}  // namespace torch_xent

// An empty Python module so that `import torch_xent._C` loads this library (and with it the op
// registrations below) without needing pybind11; the ops are reached through torch.ops.torch_xent.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(torch_xent, m) {
  // Fused softmax cross-entropy over the rows of a 2-D (M, C) logits tensor.
  //   target: (M,) int64 class indices, or (M, C) class probabilities of the logits' dtype.
  //   weight: optional (C,) class weights of the logits' dtype.
  //   reduction: 0 none, 1 mean, 2 sum.   softcap: 0.0 means off.
  // Returns (loss, lse, grad): loss (M,) for none and () otherwise, in float32 (float64 for double
  // logits); lse (M,) in the same accumulation dtype (0 for ignored rows); grad (M, C) in the
  // logits' dtype = d loss / d logits (per row for `none`), or an empty tensor when !compute_grad.
  // Logits may also be 3-D (N, C, S), K-dimensional input in its own layout (CPU kernel only):
  // then the class targets and the per-row loss and lse are (N, S), M = N * S, and the probability
  // targets and the gradient are (N, C, S) like the logits.
  m.def(
      "cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, bool compute_grad, "
      "bool need_lse=True) -> (Tensor, Tensor, Tensor)");
  // need_lse=False: the caller discards the lse, which (N, C, S) logits on the CPU then do not
  // materialise (lse comes back empty); 2-D logits, whose kernel keeps it in a register, return it.
  // The same, writing the gradient into the logits' own storage instead of a new buffer.
  m.def(
      "cross_entropy_forward_inplace(Tensor(a!) logits, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, bool need_lse=True) -> (Tensor, Tensor)");
  // The loss alone, with its autograd node in C++ (xent_autograd.cpp): 2-D logits and class-index
  // targets, without z_loss or softcap. Private: functional.py calls it in eager mode only.
  m.def(
      "_cross_entropy_loss(Tensor logits, Tensor target, Tensor? weight, int reduction, int ignore_index, "
      "float label_smoothing) -> Tensor");
  // Scales a stored gradient by grad_output (a 0-d tensor, or (M,) / (N, S) per row for `none`).
  m.def("cross_entropy_backward(Tensor grad, Tensor grad_output) -> Tensor");
  // Which accelerator kernels were compiled in: -1 for none, else the CUDA major.minor as 100*major+minor.
  m.def("cuda_version() -> int", &torch_xent::cuda_version);
  // How many threads the CPU kernel's at::parallel_for really runs on for `tasks` tasks of grain 1
  // (a build check: 1 means the extension was compiled without the OpenMP that torch uses).
  m.def("cpu_parallel_threads(int tasks) -> int", &torch_xent::cpu::parallel_threads);
  // Which instruction-set variant of the CPU row kernel runs (chosen at run time, see cpu/xent_cpu.h).
  m.def("cpu_kernel_variant() -> str", &torch_xent::cpu::kernel_variant);
  // The CPU op's cache of idle gradient buffers (cpu/xent_kernel.cpp); torch_xent/_native.py wraps these.
  m.def("cpu_set_gradient_cache(bool enabled) -> ()", &torch_xent::cpu::set_gradient_cache);
  m.def("cpu_gradient_cache_enabled() -> bool", &torch_xent::cpu::gradient_cache_enabled);
  m.def("cpu_release_gradient_cache() -> int", &torch_xent::cpu::release_gradient_cache);
  m.def("cpu_gradient_cache_bytes() -> int", &torch_xent::cpu::gradient_cache_bytes);
}

TORCH_LIBRARY_IMPL(torch_xent, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy_backward", &torch_xent::cross_entropy_backward);
}
