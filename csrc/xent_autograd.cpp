// The autograd node of the common case, in C++: torch_xent::_cross_entropy_loss.
//
// SoftmaxCrossEntropyFunction (torch_xent/autograd.py) is the autograd formula of every case, but a
// Python autograd.Function costs tens of microseconds per call on each side (apply, then the engine's
// round trip into Python for the backward): more than the whole eager loss at small shapes (iris's
// 150 x 3). This node does the same in C++ for the case most calls are: 2-D (M, C) logits, class-index
// targets, class weights, ignore_index, label smoothing and every reduction, out of place. The
// forward runs the fused op (loss and gradient in one pass) and keeps the gradient; the backward
// scales it by grad_output and hands the same buffer back (not at all for a grad_output of 1 on the
// CPU), so autograd can accumulate it into .grad without a copy.
//
// functional.py calls this op only in eager mode on plain tensors: under torch.compile, vmap or
// other functorch transforms, with z_loss, softcap, probability targets, K-dim layouts or
// inplace_backward, the Python Function runs instead. (A C++ autograd Function inside an op is
// opaque to torch.compile, which is why the op is private and never traced.)
//
// Double backward (create_graph=True) is exact: the backward then recomputes the gradient with
// differentiable ATen operations, the formula of torch_xent/reference.py's row_terms for this case:
//   q_j  = valid * ((1 - eps) w_y [j == y] + eps / C w_j),   s = sum_j q_j
//   grad = scale * (s * softmax(z) - q)          (scale: grad_output, over sum of w_y for `mean`)
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>

namespace torch_xent {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kReductionMean = 1;

using ForwardSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                            int64_t, int64_t, double, double, double, bool, bool);

// The fused forward op, through the dispatcher (so that the kernel of the logits' device runs),
// below autograd: this node is the autograd formula, and the op's own (registered from Python in
// torch_xent/_native.py) would cost a round trip into Python on every call for nothing.
std::tuple<Tensor, Tensor, Tensor> fused_forward(const Tensor& logits, const Tensor& target,
                                                 const std::optional<Tensor>& weight, int64_t reduction,
                                                 int64_t ignore_index, double label_smoothing) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_xent::cross_entropy_forward", "")
                             .typed<ForwardSignature>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(logits, target, weight, reduction, ignore_index, label_smoothing, 0.0, 0.0, true, false);
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// d loss / d logits with differentiable operations (see the formula at the top), times grad_output.
Tensor differentiable_grad(const Tensor& logits, const Tensor& target, const Tensor& weight, int64_t reduction,
                           int64_t ignore_index, double eps, const Tensor& grad_output) {
  const auto acc = acc_type(logits.scalar_type());
  const int64_t classes = logits.size(1);
  const Tensor z = logits.to(acc);
  const Tensor zero = at::zeros({}, z.options());
  const Tensor valid = target.ne(ignore_index);
  const Tensor y = at::where(valid, target, at::zeros({}, target.options()));
  const Tensor w = weight.defined() ? weight.to(acc) : Tensor();
  const Tensor wy = w.defined() ? at::where(valid, w.index_select(0, y), zero) : valid.to(acc);
  Tensor q = at::zeros_like(z).scatter(1, y.unsqueeze(1), ((1.0 - eps) * wy).unsqueeze(1));
  if (eps > 0) {
    const Tensor per_class = w.defined() ? w : at::ones({classes}, z.options());
    q = q + (eps / static_cast<double>(classes)) * valid.to(acc).unsqueeze(1) * per_class.unsqueeze(0);
  }
  // The row max is a constant for autograd (as in reference.py), so d lse / dz is exactly softmax.
  const Tensor m = z.detach().amax(1, true);
  const Tensor lse = m + at::log(at::exp(z - m).sum(1, true));
  Tensor grad = q.sum(1, true) * at::exp(z - lse) - q;
  Tensor scale = grad_output.to(acc);
  if (reduction == kReductionMean) scale = scale / wy.sum();
  grad = grad * (scale.dim() > 0 ? scale.unsqueeze(1) : scale);
  // Ignored rows count for nothing, even when their logits are not finite or the mean's 0/0 is NaN.
  return at::where(valid.unsqueeze(1), grad, zero).to(logits.scalar_type());
}

struct CrossEntropyNode : public torch::autograd::Function<CrossEntropyNode> {
  static Tensor forward(AutogradContext* ctx, const Tensor& logits, const Tensor& target,
                        const std::optional<Tensor>& weight, int64_t reduction, int64_t ignore_index,
                        double label_smoothing) {
    auto [loss, lse, grad] = fused_forward(logits, target, weight, reduction, ignore_index, label_smoothing);
    ctx->save_for_backward({logits, target, weight.value_or(Tensor())});
    ctx->saved_data["grad"] = grad;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    return loss.scalar_type() == logits.scalar_type() ? loss : loss.to(logits.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& grad_output = grad_outputs[0];
    const auto saved = ctx->get_saved_variables();
    const Tensor& logits = saved[0];
    const Tensor& target = saved[1];
    const Tensor& weight = saved[2];
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    if (at::GradMode::is_enabled()) {  // create_graph=True: a gradient that is itself differentiable
      return {differentiable_grad(logits, target, weight, reduction, ignore_index, label_smoothing, grad_output),
              Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    // vmap over the backward (is_grads_batched, jacobians): scale out of place, keep the buffer.
    const bool batched = grad_output.key_set().has_any(
        c10::DispatchKeySet({c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::Batched,
                             c10::DispatchKey::BatchedNestedTensor}));
    // Otherwise take the stored gradient: the node keeps no reference, so autograd may steal the buffer.
    Tensor grad;
    auto stored = ctx->saved_data.find("grad");
    if (stored != ctx->saved_data.end() && stored->second.isTensor()) {
      if (batched) {
        grad = stored->second.toTensor();
      } else {
        grad = std::move(stored->second).toTensor();
        stored->second = c10::IValue();
      }
    }
    if (!grad.defined()) {  // a second backward through the graph (retain_graph=True): the same kernel again
      const std::optional<Tensor> w = weight.defined() ? std::optional<Tensor>(weight) : std::nullopt;
      grad = std::get<2>(fused_forward(logits, target, w, reduction, ignore_index, label_smoothing));
    }
    if (batched) {
      const Tensor go = grad_output.to(grad.scalar_type());
      return {grad * (go.dim() > 0 ? go.unsqueeze(1) : go), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    if (grad_output.dim() > 0) {
      grad.mul_(grad_output.unsqueeze(1).to(grad.scalar_type()));
    } else if (!grad_output.device().is_cpu() || grad_output.item<double>() != 1.0) {
      // Off the CPU grad_output is never read on the host (that would synchronise).
      grad.mul_(grad_output.to(grad.scalar_type()));
    }
    return {grad, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor cross_entropy_loss(const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
                          int64_t reduction, int64_t ignore_index, double label_smoothing) {
  TORCH_CHECK(logits.dim() == 2, "torch_xent::_cross_entropy_loss: logits must be 2-D (M, C), got ", logits.dim(),
              "-D");
  TORCH_CHECK(!target.is_floating_point(), "torch_xent::_cross_entropy_loss: class-index targets only");
  if (!at::GradMode::is_enabled() || !logits.requires_grad()) {
    // No graph to record: the loss alone, without the gradient the node would keep.
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("torch_xent::cross_entropy_forward", "")
                               .typed<ForwardSignature>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Tensor loss =
        std::get<0>(op.call(logits, target, weight, reduction, ignore_index, label_smoothing, 0.0, 0.0, false, false));
    return loss.scalar_type() == logits.scalar_type() ? loss : loss.to(logits.scalar_type());
  }
  return CrossEntropyNode::apply(logits, target, weight, reduction, ignore_index, label_smoothing);
}

}  // namespace
}  // namespace torch_xent

// The node is the op's autograd formula and its implementation for every backend at once (it calls
// the fused forward op, which dispatches to the device's kernel).
TORCH_LIBRARY_IMPL(torch_xent, CompositeImplicitAutograd, m) {
  m.impl("_cross_entropy_loss", &torch_xent::cross_entropy_loss);
}
