"""The public loss functions: check the arguments once, build the options once, reshape, dispatch.

- :func:`cross_entropy` / :func:`cross_entropy_with_lse`: a drop-in for ``F.cross_entropy``,
  through :class:`torch_xent.autograd.SoftmaxCrossEntropyFunction`.
- :func:`linear_cross_entropy`: ``F.cross_entropy(F.linear(...))`` without the (N, V) logits,
  through :class:`torch_xent.linear.LinearCrossEntropyFunction`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from torch_xent import _checks, aten
from torch_xent import _native
from torch_xent._native import resolve_impl
from torch_xent._options import LossOptions, loss_options
from torch_xent._checks import is_compiling
from torch_xent.autograd import SoftmaxCrossEntropyFunction, fused_forward, is_batched


# The CPU kernel's K-dim layout compares class indices in float32 lanes: exact below 2**24 (the
# CUDA kernel's too, for one limit on every device).
_POSITIONS_MAX_CLASSES = 1 << 24
# The CUDA kernel reads K-dim input in its own layout with a thread a position: where the classes are
# few and the positions many (segmentation's), not where one thread would walk a long row alone or the
# positions would not fill the GPU; such input gets (M, C) rows and the row kernels.
CUDA_POSITIONS_MAX_CLASSES = 1024
CUDA_POSITIONS_MIN_POSITIONS = 1 << 16


def _reads_positions(kernel, input) -> bool:
    """Whether ``kernel`` takes contiguous K-dim input as (N, C, S) positions rather than rows."""
    if kernel == "aten":
        return True
    if kernel != "native":
        return False
    if input.device.type == "cpu":
        return True
    if input.device.type != "cuda" or input.dim() < 3:
        return False
    num_classes = input.shape[1]
    return (0 < num_classes <= CUDA_POSITIONS_MAX_CLASSES
            and input.numel() // num_classes >= CUDA_POSITIONS_MIN_POSITIONS)


def _flatten_problem(input, target, soft, positions_layout=False):
    """The 2-D problem: (logits (M, C), target (M,) int64 or (M, C) probabilities, out_shape), where
    out_shape is the shape of the unreduced loss.

    K-dim (N, C, d1, ..., dK) input is copied to (M, C) rows only when it has to be: channels-last
    memory already is rows (a view), and with ``positions_layout`` (the compiled kernels and the
    pure-PyTorch path) contiguous input becomes an (N, C, S) view that the kernel reads as it is.
    Other layouts are copied."""
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    if input.dim() == 1:
        out_shape = ()
        logits = input.unsqueeze(0)
        tgt = target.reshape(1, -1) if soft else target.reshape(1)
    elif input.dim() == 2:
        out_shape = (input.shape[0],)
        logits, tgt = input, target
    else:
        out_shape = (input.shape[0], *input.shape[2:])
        rows_view = input.movedim(1, -1)
        if (positions_layout and not rows_view.is_contiguous() and input.is_contiguous()
                and num_classes < _POSITIONS_MAX_CLASSES):
            n = input.shape[0]
            logits = input.view(n, num_classes, -1)
            tgt = target.reshape(n, num_classes, -1) if soft else target.reshape(n, -1)
        else:
            logits = rows_view.reshape(-1, num_classes)
            tgt = target.movedim(1, -1).reshape(-1, num_classes) if soft else target.reshape(-1)
    if soft:
        tgt = tgt.to(input.dtype)
    elif tgt.dtype != torch.int64:
        tgt = tgt.long()
    return logits.contiguous(), tgt.contiguous(), out_shape


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
        impl: ``"auto"`` (the compiled kernel when built and validated for the input's device, else
            ``"aten"``), ``"native"`` (compiled kernel, an error if missing), ``"aten"`` (the fast
            pure-PyTorch path) or ``"reference"`` (the readable pure-PyTorch statement, slow).

    Returns the loss in the input's dtype: a scalar for ``mean``/``sum``, the target's shape for ``none``.
    """
    opts = loss_options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    return _cross_entropy(input, target, weight, opts, inplace_backward, impl)[0]


def cross_entropy_with_lse(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                           *, z_loss=0.0, softcap=None, inplace_backward=False, impl="auto"):
    """Like :func:`cross_entropy`, also returning the per-row log-sum-exp that the kernel computed.

    Returns ``(loss, lse)``; ``lse`` has the shape of the unreduced loss, in float32 (float64 for
    float64 input), 0 for ignored rows, and carries no gradient. Useful for statistics (mean lse,
    probability of the target class = exp(z_y - lse)) at no extra pass over the logits.
    """
    opts = loss_options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    return _cross_entropy(input, target, weight, opts, inplace_backward, impl, with_lse=True)


def _native_node_applies(kernel, logits, soft, opts, inplace_backward) -> bool:
    """Whether the C++ autograd node (``torch_xent::_cross_entropy_loss``, csrc/xent_autograd.cpp)
    runs instead of the Python Function: the native CPU kernel on 2-D rows with class-index targets,
    without the options the node does not carry, in eager mode on plain tensors (torch.compile and
    functorch transforms get the Python Function, which they know how to trace)."""
    return (kernel == "native" and logits.dim() == 2 and not soft and not inplace_backward and not opts.z_loss
            and opts.softcap is None and logits.device.type == "cpu" and not is_compiling()
            and not is_batched(logits))


def _plain_cpu_loss(input, target, opts: LossOptions, impl):
    """The loss of a CPU problem in its common form (2-D float logits, 1-D int64 targets of the same
    batch, no class weights, no z_loss or softcap), or None for every other problem. At a few
    thousand logits a loss costs its per-call overhead, so this way does only the checks whose
    failures the op would not report as ``F.cross_entropy`` does; anything else, bad input included,
    goes the general way with every check. The native kernel runs through its C++ op (a C++ autograd
    node where a gradient is wanted, the loss alone otherwise: what the general way runs for this
    form), the pure-PyTorch path through F.cross_entropy's own op up to
    :data:`torch_xent.aten.TORCH_LOSS_ELEMENTS` logits, as :func:`torch_xent.aten.runs_torch_loss`
    says it would."""
    if not (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor) and input.is_cpu and target.is_cpu
            and input.dim() == 2 and target.dim() == 1 and target.dtype is torch.int64
            and input.dtype.is_floating_point and input.numel() > 0 and target.shape[0] == input.shape[0]
            and not opts.z_loss and opts.softcap is None):
        return None
    native = _native._AVAILABLE.get("cpu", False)
    if impl == "aten" or (impl == "auto" and not native):
        if input.numel() > aten.TORCH_LOSS_ELEMENTS or is_compiling():
            return None
        return torch._C._nn.cross_entropy_loss(input, target, None, opts.reduction_code, opts.ignore_index,
                                               opts.label_smoothing)
    if (impl == "auto" or impl == "native") and native and not is_compiling() and not is_batched(input):
        return torch.ops.torch_xent._cross_entropy_loss(input, target, None, opts.reduction_code, opts.ignore_index,
                                                        opts.label_smoothing)
    return None


def _cross_entropy(input, target, weight, opts: LossOptions, inplace_backward, impl, with_lse=False):
    if weight is None and not with_lse and not inplace_backward:
        loss = _plain_cpu_loss(input, target, opts, impl)
        if loss is not None:
            return loss, None
    _checks.check_logits(input)
    kernel = resolve_impl(impl, input.device)
    soft = _checks.check_targets(input, target, opts.ignore_index)
    logits, tgt, out_shape = _flatten_problem(input, target, soft, _reads_positions(kernel, input))
    weight = _checks.check_weight(weight, input, logits.shape[1])
    needs_grad = torch.is_grad_enabled() and (input.requires_grad or (soft and tgt.requires_grad))
    if not with_lse and kernel == "aten" and aten.runs_torch_loss(logits, opts, inplace_backward):
        # F.cross_entropy's own op, without its Python wrapper (the options are already checked; the
        # binding still honours __torch_function__): a microsecond or two of a 10-microsecond loss.
        loss = torch._C._nn.cross_entropy_loss(logits, tgt, weight, opts.reduction_code, opts.ignore_index,
                                               opts.label_smoothing)
        return (loss.reshape(out_shape) if opts.reduction == "none" else loss), None
    if needs_grad and not with_lse and _native_node_applies(kernel, logits, soft, opts, inplace_backward):
        loss = torch.ops.torch_xent._cross_entropy_loss(logits, tgt, weight, opts.reduction_code, opts.ignore_index,
                                                        opts.label_smoothing)
        return (loss.reshape(out_shape) if opts.reduction == "none" else loss), None
    if needs_grad:
        loss, lse = SoftmaxCrossEntropyFunction.apply(logits, tgt, weight, opts, inplace_backward, kernel, with_lse)
    else:
        loss, lse, _ = fused_forward(logits, tgt, weight, opts, False, False, kernel, with_lse)
        loss = loss.to(input.dtype)
    if opts.reduction == "none" and len(out_shape) != 1:
        loss = loss.reshape(out_shape)
    if not with_lse:
        return loss, None
    return loss, (lse if len(out_shape) == 1 else lse.reshape(out_shape))


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=None, label_smoothing=0.0, options=None, z_loss=0.0, softcap=None,
                         chunk_size=None, impl="auto"):
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the logits:
    a drop-in for ``torch.nn.functional.linear_cross_entropy`` (same arguments, semantics and errors).

    Args:
        input: ``(N, D)`` features, or ``(D,)`` for one sample; float16, bfloat16, float32 or float64.
        linear_weight: ``(C, D)`` classifier weight, or ``(C, d1, ..., dK, D)`` for a K-dimensional loss
            (the logits are then ``(N, C, d1, ..., dK)``; needs batched input).
        target: class indices ``(N,)`` / ``(N, d1, ..., dK)`` / ``()`` (int64 or uint8) in ``[0, C)`` or
            equal to ``ignore_index``; or class probabilities of the logits' shape.
        linear_bias: optional bias, ``(C,)`` or ``(C, d1, ..., dK)``.
        weight: optional ``(C,)`` class weights, as ``F.cross_entropy``'s ``weight``.
        reduction, label_smoothing: as in ``F.cross_entropy``.
        ignore_index: ``None`` (PyTorch's default) means -100 for class indices; it must stay ``None``
            for class probabilities.
        options: a ``torch.nn.LinearCrossEntropyOptions`` or None. torch_xent always works chunk by
            chunk; from ``options`` it takes ``batch_chunk_size`` / ``chunking_method`` (rows per
            chunk), ``acc_dtype`` (for half inputs: the input's own dtype accumulates the weight and
            bias gradients in half precision, anything else in float32) and ``allow_retain_graph``
            (False: a second backward raises, as PyTorch's chunked path does; with ``options=None``
            a second backward recomputes).
        z_loss, softcap: torch_xent's additions, as in :func:`torch_xent.cross_entropy`.
        chunk_size: torch_xent's addition: rows per chunk (overrides ``options``); None picks
            :func:`torch_xent.linear.default_chunk_rows` (a (chunk, C) logits buffer of about
            ``CHUNK_BYTES``, at least ``MIN_CHUNK_ROWS`` (256) rows).
        impl: ``"auto"``, ``"native"`` or ``"reference"``: the kernel that turns each chunk's
            logits into its loss and gradient.

    Returns the loss in the input's dtype. Only a (chunk, C * d1 * ... * dK) block of logits exists at
    a time. With ``mean``/``sum`` and gradients enabled, the gradients are computed during the forward
    (the backward only scales them): evaluate under ``torch.no_grad()`` to skip that work. ``none``
    recomputes the logits in the backward.
    """
    from torch_xent import linear

    num_classes, out_features, logits_shape = _checks.check_linear_args(input, linear_weight, target, linear_bias,
                                                                        ignore_index)
    opts = loss_options(reduction, -100 if ignore_index is None else ignore_index, label_smoothing, z_loss, softcap)
    soft = _checks.check_targets(input, target, opts.ignore_index, shape=logits_shape)
    # linear.py takes a bool (the schema of its compiled op): the compiled kernel, or the reference.
    kernel = resolve_impl(impl, input.device)
    weight = _checks.check_weight(weight, input, num_classes)
    _checks.check_chunk_size(chunk_size)
    positions = math.prod(out_features)
    batched = input.dim() == 2
    x = (input if batched else input.unsqueeze(0)).contiguous()
    n, in_features = x.shape
    w = linear_weight.reshape(num_classes * positions, in_features).contiguous()
    b = None if linear_bias is None else linear_bias.reshape(num_classes * positions).contiguous()
    if soft:
        y = target.reshape(n, num_classes, positions).to(input.dtype).contiguous()
    else:
        y = target.reshape(n * positions).long().contiguous()
        if y.device.type == "cpu":  # a cheap check up front, before any work (on CUDA it would synchronise)
            _checks.check_targets_in_range(y, num_classes, opts.ignore_index)
    rows = linear.chunk_rows_for(options, chunk_size, n, in_features, num_classes * positions, x.dtype)
    prob = linear.LinearProblem(num_classes, positions, soft, rows, kernel,
                                linear.half_accumulates_in_float32(options, x.dtype))
    grad_inputs = (input, linear_weight, linear_bias, target if soft else None)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs):
        allow_retain = options is None or bool(options.allow_retain_graph)
        loss = linear.LinearCrossEntropyFunction.apply(x, w, b, y, weight, opts, prob, allow_retain)
    else:
        loss = linear.no_grad_loss(x, w, b, y, weight, opts, prob).to(input.dtype)
    if opts.reduction != "none":
        return loss
    return loss.reshape((n, *out_features) if batched else ())
