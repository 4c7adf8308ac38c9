"""The autograd Function: a manual forward that computes the loss and its gradient in one fused pass,
and a manual backward that only scales that stored gradient by grad_output."""

from __future__ import annotations

import contextlib

import torch

from torch_xent import aten, reference
from torch_xent._options import LossOptions


from torch_xent._checks import is_compiling


def fused_forward(logits, target, weight, opts: LossOptions, compute_grad, inplace, kernel, need_lse=True):
    """Runs one implementation on a 2-D contiguous (M, C) problem (or, native kernels only, a 3-D
    contiguous (N, C, S) one: K-dim input in its own layout, rows (N, S)): ``kernel`` is "native"
    (the compiled op), "aten" (the fast pure-PyTorch path) or "reference" (the readable one), as
    ``torch_xent._native.resolve_impl`` chose it.

    Returns (loss in the accumulation dtype, lse (M,), grad (M, C) or None). With ``inplace`` the
    gradient is written into ``logits`` itself and ``grad`` is ``logits``. With ``need_lse=False`` the
    caller discards the lse: an implementation may skip it (aten does) and return an empty tensor.
    """
    if kernel == "native":
        ops = torch.ops.torch_xent
        args = (target, weight, opts.reduction_code, opts.ignore_index, opts.label_smoothing, opts.z_loss,
                opts.softcap_value)
        if is_compiling():
            guard = contextlib.nullcontext()
        else:
            # Straight to the kernel: this Function is the autograd formula, so the op's own
            # (Python) autograd registration would only add tens of microseconds per call.
            guard = torch._C._AutoDispatchBelowAutograd()
        with guard:
            if inplace and compute_grad:
                loss, lse = ops.cross_entropy_forward_inplace(logits, *args, need_lse)
                return loss, lse, logits
            loss, lse, grad = ops.cross_entropy_forward(logits, *args, compute_grad, need_lse)
        return loss, lse, (grad if compute_grad else None)
    if kernel == "aten":
        loss, lse, grad = aten.cross_entropy_forward(logits, target, weight, opts, compute_grad, inplace,
                                                     need_lse=need_lse)
        return loss, lse, (grad if compute_grad else None)
    if kernel != "reference":
        raise ValueError(f"torch_xent: unknown kernel {kernel!r}; one of 'native', 'aten', 'reference'")
    loss, lse, grad = reference.cross_entropy_forward(logits, target, weight, opts, compute_grad)
    if not compute_grad:
        return loss, lse, None
    if inplace:
        logits.copy_(grad)
        return loss, lse, logits
    return loss, lse, grad


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    """Softmax cross-entropy with a hand-written forward and backward.

    ``apply(logits, target, weight, opts, inplace_backward, kernel[, need_lse])`` -> (loss, lse)

    - logits: (M, C) contiguous, float16 / bfloat16 / float32 / float64; or, for the native
      kernels (CPU and CUDA), (N, C, S) contiguous (K-dim input with its positions flattened,
      M = N * S rows whose loss and lse are (N, S), and whose gradient comes back in that layout).
    - target: (M,) int64 class indices, or (M, C) class probabilities in the logits' dtype
      ((N, S) and (N, C, S) for 3-D logits).
    - weight: (C,) in the logits' dtype, or None.
    - opts: a :class:`torch_xent.LossOptions` (``torch_xent.loss_options(...)`` checks and builds one);
      the loss is (M,) for reduction "none", else 0-d, in the logits' dtype.
    - kernel: "native", "aten" or "reference" (see :func:`fused_forward`).
    - need_lse: False when the caller discards the lse (then it may come back empty).

    The forward computes d loss / d logits while each row is in cache and keeps it; the backward
    scales it by grad_output in place (not at all when grad_output is 1 on the CPU) and hands the
    same buffer back, so forward + backward allocate one (M, C) tensor; with ``inplace_backward``
    the gradient lives in the logits' storage and nothing of size (M, C) is allocated.

    Double backward (``create_graph=True``) is real: the backward then recomputes the gradient from
    the saved logits with differentiable operations (``reference.row_terms``), so higher derivatives
    are exact. It is not available with ``inplace_backward``, whose logits were overwritten.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, opts, inplace_backward, kernel, need_lse=True):
        compute_grad = ctx.needs_input_grad[0]
        inplace = bool(inplace_backward) and compute_grad and not is_compiling()
        loss, lse, grad = fused_forward(logits, target, weight, opts, compute_grad, inplace, kernel, need_lse)
        ctx.opts = opts
        ctx.kernel = kernel
        ctx.inplace = inplace
        ctx.logits_dtype = logits.dtype
        ctx.num_rows = logits.shape[0] if logits.dim() == 2 else logits.shape[0] * logits.shape[2]
        if inplace:
            # The logits now hold the gradient: any other op that saved them must notice.
            torch.autograd.graph.increment_version(logits)
        to_save = [None if inplace else logits, target, weight]
        ctx.compiled = is_compiling()
        if ctx.compiled:  # dynamo wants every tensor the backward reads in save_for_backward
            to_save.append(grad)
        else:
            ctx.grad_buffer = grad
        ctx.save_for_backward(*to_save)
        ctx.mark_non_differentiable(lse)
        return (loss if loss.dtype == logits.dtype else loss.to(logits.dtype)), lse

    @staticmethod
    def backward(ctx, grad_output, _grad_lse):
        grad_logits = grad_target = None
        saved = ctx.saved_tensors
        logits, target, weight = saved[0], saved[1], saved[2]
        if ctx.needs_input_grad[0]:
            if ctx.compiled:
                grad_logits = _scaled(saved[3], grad_output)
            elif torch.is_grad_enabled():
                grad_logits = _differentiable_grad(ctx, logits, target, weight, grad_output)
            else:
                grad_logits = _take_buffer(ctx, logits, target, weight, grad_output)
        if ctx.needs_input_grad[1]:
            if logits is None:
                raise RuntimeError("torch_xent: the gradient with respect to a soft target needs the logits, "
                                   "which inplace_backward=True overwrote; use inplace_backward=False")
            scale = reference.reduction_scale(target, weight, ctx.opts, ctx.num_rows,
                                              reference.acc_dtype(ctx.logits_dtype))
            rows, target_rows = _as_rows(logits, target)
            grad_target = reference.target_gradient(rows, target_rows, weight, ctx.opts.label_smoothing,
                                                    ctx.opts.softcap,
                                                    (grad_output.to(scale.dtype) * scale).reshape(-1)
                                                    if grad_output.dim() else grad_output.to(scale.dtype) * scale)
            grad_target = _from_rows(grad_target, logits).to(target.dtype)
        return grad_logits, grad_target, None, None, None, None, None


# functorch's predicates for a tensor seen through vmap, looked up once (the backward runs per step).
_BATCHED_CHECKS = tuple(getattr(torch._C._functorch, name)
                        for name in ("is_functorch_wrapped_tensor", "is_batchedtensor", "is_legacy_batchedtensor")
                        if hasattr(getattr(torch._C, "_functorch", None), name))


def is_batched(t) -> bool:
    for check in _BATCHED_CHECKS:
        if check(t):
            return True
    return False


def _as_rows(logits, target):
    """An (N, C, S) problem as the (M, C) rows that the reference's formulas take (a copy: only the
    double backward and a soft target's gradient need it); a 2-D problem as it is."""
    if logits.dim() == 2:
        return logits, target
    c = logits.shape[1]
    rows = logits.transpose(1, 2).reshape(-1, c)
    return rows, (target.transpose(1, 2).reshape(-1, c) if target.dtype.is_floating_point else target.reshape(-1))


def _from_rows(grad, like):
    """(M, C) rows back in the layout of ``like`` ((N, C, S) or (M, C))."""
    if like.dim() == 2:
        return grad
    n, c, s = like.shape
    return grad.reshape(n, s, c).transpose(1, 2)


def _scaled(grad, grad_output):
    if grad_output.dim() > 0:  # one value per row: (M,), or (N, S) for an (N, C, S) gradient
        return grad * grad_output.unsqueeze(1).to(grad.dtype)
    return grad * grad_output.to(grad.dtype)


def _differentiable_grad(ctx, logits, target, weight, grad_output):
    if logits is None:
        raise RuntimeError("torch_xent: double backward (create_graph=True) is not supported with "
                           "inplace_backward=True, which overwrote the logits; use inplace_backward=False")
    rows, target_rows = _as_rows(logits, target)
    _, _, grad, valid = reference.row_terms(rows, target_rows, weight, ctx.opts)
    scale = reference.reduction_scale(target_rows, weight, ctx.opts, ctx.num_rows, grad.dtype)
    go = grad_output.to(grad.dtype).reshape(-1) if grad_output.dim() else grad_output.to(grad.dtype)
    return _from_rows(reference.scale_rows(grad, scale * go, valid), logits).to(ctx.logits_dtype)


def _take_buffer(ctx, logits, target, weight, grad_output):
    """Hands the stored gradient back, scaled in place; the Function keeps no reference to it, so
    autograd can accumulate it into .grad without a copy."""
    batched = is_batched(grad_output)  # vmap over the backward (is_grads_batched): scale out of place
    grad = ctx.grad_buffer
    if not batched:
        ctx.grad_buffer = None
    if grad is None:  # a second backward through the same graph (retain_graph=True)
        if ctx.inplace:
            raise RuntimeError("torch_xent: with inplace_backward=True the gradient lives in the logits and "
                               "can be taken once; a second backward through the same graph is not supported")
        # Recompute with the same implementation as the forward, so that every backward through the
        # graph gives bit-identical gradients (gradcheck's reentrancy check asks for exactly that).
        with torch.no_grad():
            _, _, grad = fused_forward(logits, target, weight, ctx.opts, True, False, ctx.kernel)
    if batched:
        return _scaled(grad, grad_output)
    if grad_output.dim() > 0:
        grad.mul_(grad_output.unsqueeze(1).to(grad.dtype))
    elif grad_output.device.type != "cpu" or float(grad_output) != 1.0:
        # On the GPU we never read grad_output on the host (that would synchronise).
        grad.mul_(grad_output.to(grad.dtype))
    return grad
