"""Public functions: argument checks with PyTorch's own messages, reshaping, then dispatch."""

from __future__ import annotations

import torch

from torch_xent import _native
from torch_xent.function import SoftmaxCrossEntropyFunction, fused_forward
from torch_xent.reference import REDUCTIONS

IMPLS = ("auto", "native", "reference")
_TYPE_NAMES = {torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.bool: "Bool",
               torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
               torch.bfloat16: "BFloat16", torch.int64: "Long", torch.uint8: "Byte"}


def _type_name(dtype: torch.dtype) -> str:
    return _TYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def resolve_impl(impl: str, device: torch.device) -> bool:
    """True when the compiled kernel is to be used for ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    available = _native.native_available(device)
    if impl == "native" and not available:
        why = _native.load_error() or f"it was built without {device.type.upper()} kernels"
        raise RuntimeError(f"torch_xent: impl='native' asked for, but no compiled kernel for {device.type} "
                           f"is available ({why}); see torch_xent.show_config()")
    return available


def check_common(input, reduction, label_smoothing):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"cross_entropy(): input must be a Tensor, not {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise NotImplementedError(f"torch_xent.cross_entropy: logits must be floating point "
                                  f"(float16, bfloat16, float32 or float64), not '{_type_name(input.dtype)}'")
    if not 0.0 <= float(label_smoothing) <= 1.0:  # PyTorch silently treats < 0 as 0: we reject it
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")


def check_weight(weight, input, num_classes):
    if weight is None:
        return None
    if weight.dim() != 1 or weight.numel() != num_classes:
        raise RuntimeError(f"weight tensor should be defined either for all {num_classes} classes or no classes "
                           f"but got weight tensor of shape: {list(weight.shape)}")
    if weight.dtype != input.dtype:
        raise RuntimeError(f"expected scalar type {_type_name(input.dtype)} but found {_type_name(weight.dtype)}")
    if weight.device != input.device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found weight on {weight.device} "
                           f"and input on {input.device}")
    return weight.contiguous()


def flatten_problem(input, target, ignore_index):
    """Checks shapes and dtypes as PyTorch does and returns the 2-D problem.

    Returns (logits (M, C), target (M,) int64 or (M, C) probabilities, out_shape, soft) where
    out_shape is the shape of the unreduced loss.
    """
    if input.dim() == 0:
        raise ValueError("cross_entropy: input must have at least one dimension (the classes), got a 0-d tensor")
    if target.device != input.device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found target on {target.device} "
                           f"and input on {input.device}")
    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    soft = tuple(target.shape) == tuple(input.shape)
    if soft:
        if not target.dtype.is_floating_point:
            raise RuntimeError(f"Expected floating point type for target with class probabilities, "
                               f"got {_type_name(target.dtype)}")
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
    else:
        if target.dtype not in (torch.int64, torch.uint8):
            raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_type_name(target.dtype)}")
        if input.dim() == 1:
            if target.dim() != 0:
                raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        elif input.dim() == 2:
            if target.dim() != 1:
                raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
            if target.shape[0] != input.shape[0]:
                raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                                 f"({target.shape[0]}).")
        else:
            expected = [input.shape[0], *input.shape[2:]]
            if list(target.shape) != expected:
                raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
    if num_classes == 0:
        raise IndexError("torch_xent.cross_entropy: the input has 0 classes (its class dimension is empty)")

    if input.dim() == 1:
        out_shape = ()
        logits = input.unsqueeze(0)
        tgt = target.unsqueeze(0)
    elif input.dim() == 2:
        out_shape = (input.shape[0],)
        logits, tgt = input, target
    else:
        out_shape = (input.shape[0], *input.shape[2:])
        logits = input.movedim(1, -1).reshape(-1, num_classes)
        tgt = target.movedim(1, -1).reshape(-1, num_classes) if soft else target.reshape(-1)
    if soft:
        tgt = tgt.to(input.dtype)
    elif tgt.dtype != torch.int64:
        tgt = tgt.long()
    return logits.contiguous(), tgt.contiguous(), out_shape, soft


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                  z_loss=0.0, softcap=None, inplace_backward=False, impl="auto"):
    """Softmax cross-entropy, a drop-in for ``torch.nn.functional.cross_entropy``.

    Args:
        input: logits, ``(N, C)``, ``(N, C, d1, ..., dK)`` or unbatched ``(C,)``; float16, bfloat16,
            float32 or float64 (half types accumulate in float32).
        target: class indices ``(N,)`` / ``(N, d1, ..., dK)`` / ``()`` of dtype int64 or uint8 in
            ``[0, C)`` or equal to ``ignore_index``; or class probabilities of the input's shape.
        weight: optional ``(C,)`` class weights of the input's dtype.
        ignore_index: class index whose rows contribute nothing (class-index targets only).
        reduction: ``"none"`` (loss of the target's shape), ``"mean"`` or ``"sum"``.
        label_smoothing: in ``[0, 1]``; mixes the target with the uniform distribution.
        z_loss: coefficient of ``lse**2`` added to each counted row (PaLM's auxiliary loss);
            it is reduced like the cross-entropy itself (same denominator for ``mean``).
        softcap: if set, the logits are first replaced by ``softcap * tanh(logits / softcap)``.
        inplace_backward: write the gradient into the logits' storage instead of a new buffer
            (the logits are overwritten; autograd raises if another op saved them).
        impl: ``"auto"`` (compiled kernel when built for the input's device, else the reference),
            ``"native"`` (compiled kernel, an error if missing) or ``"reference"`` (pure PyTorch).

    Returns the loss in the input's dtype: a scalar for ``mean``/``sum``, the target's shape for ``none``.
    """
    return _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                          inplace_backward, impl)[0]


def cross_entropy_with_lse(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                           *, z_loss=0.0, softcap=None, inplace_backward=False, impl="auto"):
    """Like :func:`cross_entropy`, also returning the per-row log-sum-exp that the kernel computed.

    Returns ``(loss, lse)``; ``lse`` has the shape of the unreduced loss, in float32 (float64 for
    float64 input), 0 for ignored rows, and carries no gradient. Useful for statistics (mean lse,
    probability of the target class = exp(z_y - lse)) at no extra pass over the logits.
    """
    return _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                          inplace_backward, impl)


def _cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                   inplace_backward, impl):
    check_common(input, reduction, label_smoothing)
    use_native = resolve_impl(impl, input.device)
    logits, tgt, out_shape, soft = flatten_problem(input, target, ignore_index)
    weight = check_weight(weight, input, logits.shape[1])
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    needs_grad = torch.is_grad_enabled() and (input.requires_grad or (soft and tgt.requires_grad))
    if needs_grad:
        loss, lse = SoftmaxCrossEntropyFunction.apply(logits, tgt, weight, reduction, ignore_index,
                                                      float(label_smoothing), float(z_loss), softcap,
                                                      inplace_backward, use_native)
    else:
        loss, lse, _ = fused_forward(logits, tgt, weight, reduction, ignore_index, float(label_smoothing),
                                     float(z_loss), softcap, False, False, use_native)
        loss = loss.to(input.dtype)
    if reduction == "none" and len(out_shape) != 1:
        loss = loss.reshape(out_shape)
    return loss, (lse if len(out_shape) == 1 else lse.reshape(out_shape))
