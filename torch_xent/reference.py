"""Pure-PyTorch kernels: the fallback when no compiled kernel is present, and the oracle for the tests.

This file is the single source of truth for the mathematics (see docs/gradient.md). Every function
works on a 2-D ``(M, C)`` view of the logits; ``functional.py`` reshapes K-dimensional and unbatched
inputs before calling in.

For one row of (soft-capped) logits ``z`` and target distribution ``q``::

    lse  = log(sum_j exp(z_j))
    loss = sum(q) * lse - sum_j q_j z_j + z_loss * lse**2
    grad = (sum(q) + 2 * z_loss * lse) * softmax(z) - q          (times d softcap / dz)

where, for a class index ``y`` with class weights ``w`` (all ones when absent) and smoothing ``eps``,
``q_j = (1 - eps) * w_y * [j == y] + eps / C * w_j`` (PyTorch's weighted label smoothing), and for
class probabilities ``t``, ``q_j = w_j * ((1 - eps) * t_j + eps / C)``.
"""

from __future__ import annotations

import torch

from torch_xent._checks import check_targets_in_range
from torch_xent._options import LossOptions


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32 for the half types, the dtype itself otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softcap(z: torch.Tensor, softcap: float | None):
    """Returns the capped logits and the chain-rule factor d cap(z) / dz (None when off)."""
    if not softcap:
        return z, None
    t = torch.tanh(z / softcap)
    return softcap * t, 1.0 - t * t


def _max_and_log_sum(z):
    """Row max m (a constant for autograd) and log(sum(exp(z - m))), as the kernels compute them.

    lse = m + log_sum. Unlike torch.logsumexp, a +inf logit gives NaN (inf - inf), which is what
    F.cross_entropy returns for such a row. Because m is a constant, d lse / dz is exactly softmax.
    """
    m = z.detach().amax(dim=1, keepdim=True)
    return m.squeeze(1), torch.log(torch.exp(z - m).sum(dim=1))


def _logsumexp(z):
    m, log_sum = _max_and_log_sum(z)
    return m + log_sum


def _target_distribution(z, target, weight, ignore_index, label_smoothing):
    """q (M, C) in z's dtype, and the mask of rows that count (not ignored)."""
    m, c = z.shape
    eps = float(label_smoothing)
    w = None if weight is None else weight.to(z.dtype)
    if target.dtype.is_floating_point:  # class probabilities
        q = target.to(z.dtype)
        if eps > 0:
            q = q * (1.0 - eps) + eps / c
        if w is not None:
            q = q * w
        valid = torch.ones(m, dtype=torch.bool, device=z.device)
        return q, valid
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).long()
    wy = torch.ones(m, dtype=z.dtype, device=z.device) if w is None else w[y]
    q = torch.zeros_like(z)
    q.scatter_(1, y.unsqueeze(1), ((1.0 - eps) * wy).unsqueeze(1))
    if eps > 0:
        q = q + (eps / c) * (w if w is not None else torch.ones(c, dtype=z.dtype, device=z.device))
    q = q * valid.unsqueeze(1).to(z.dtype)
    return q, valid


def reduction_scale(target, weight, opts: LossOptions, num_rows, dtype):
    """The factor that turns per-row losses into the reduced loss: 1/denominator for `mean`.

    For class indices PyTorch divides by the sum of w[y] over the rows that are not ignored (their
    count without weights), for probabilities by the number of rows. 0/0 stays NaN, as in PyTorch.
    """
    device = target.device
    if opts.reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    if target.dtype.is_floating_point:
        return torch.full((), 1.0 / num_rows if num_rows else float("nan"), dtype=dtype, device=device)
    valid = target != opts.ignore_index
    if weight is None:
        denom = valid.sum().to(dtype)
    else:
        y = torch.where(valid, target, torch.zeros_like(target)).long()
        denom = torch.where(valid, weight.to(dtype)[y], torch.zeros((), dtype=dtype, device=device)).sum()
    return 1.0 / denom


def row_terms(logits, target, weight, opts: LossOptions):
    """Per-row loss, lse and the row gradient d loss_i / d logits_i, with differentiable torch ops
    (``opts.reduction`` is not used: the rows are not reduced).

    Used under no_grad by the reference forward, and with grad enabled by the double backward of
    every implementation (it is differentiable in logits and in soft targets).
    Returns (loss (M,), lse (M,), grad (M, C), valid (M,)) in the accumulation dtype.
    """
    acc = acc_dtype(logits.dtype)
    z_loss = opts.z_loss
    z, dcap = _softcap(logits.to(acc), opts.softcap)
    q, valid = _target_distribution(z, target, weight, opts.ignore_index, opts.label_smoothing)
    m, log_sum = _max_and_log_sum(z)
    lse = m + log_sum
    sum_q = q.sum(dim=1)
    # Everything relative to the row max, so that logits of magnitude 1e4 lose no digits:
    # loss = sum_q * log_sum - sum_j q_j (z_j - m). q_j (z_j - m) counts as 0 where q_j == 0, even for
    # z_j = -inf (a class the model rules out).
    zs = z - m.unsqueeze(1)
    qz = torch.where(q != 0, q * zs, torch.zeros((), dtype=acc, device=z.device)).sum(dim=1)
    loss = sum_q * log_sum - qz
    coef = sum_q
    if z_loss:
        loss = loss + z_loss * lse * lse
        coef = coef + 2.0 * z_loss * lse
    p = torch.exp(z - lse.unsqueeze(1))
    grad = coef.unsqueeze(1) * p - q
    if dcap is not None:
        grad = grad * dcap
    zero = torch.zeros((), dtype=acc, device=z.device)
    # Ignored rows count for nothing, even when their logits are NaN or infinite.
    loss = torch.where(valid, loss, zero)
    lse = torch.where(valid, lse, zero)
    grad = torch.where(valid.unsqueeze(1), grad, zero)
    return loss, lse, grad, valid


def cross_entropy_forward(logits, target, weight, opts: LossOptions, compute_grad=True):
    """Reference of the ``torch_xent::cross_entropy_forward`` op (same inputs and outputs).

    logits: (M, C) floating; target: (M,) int64 or (M, C) probabilities; weight: (C,) or None.
    Returns (loss, lse, grad) as the compiled op does: loss (M,) for reduction "none", else 0-d,
    and lse in the accumulation dtype; grad (M, C) in the logits' dtype (empty without compute_grad).
    """
    reduction = opts.reduction
    with torch.no_grad():
        if not target.dtype.is_floating_point:
            check_targets_in_range(target, logits.shape[1], opts.ignore_index)
        loss, lse, grad, valid = row_terms(logits, target, weight, opts)
        scale = reduction_scale(target, weight, opts, logits.shape[0], loss.dtype)
        if reduction != "none":
            loss = loss.sum() * scale
            grad = scale_rows(grad, scale, valid)
        grad = grad.to(logits.dtype) if compute_grad else logits.new_empty(0)
    return loss, lse, grad


def scale_rows(grad, scale, valid):
    """grad * scale, keeping ignored rows exactly 0 when the scale is inf or NaN (every row ignored)."""
    if scale.dim() == 1:
        scale = scale.unsqueeze(1)
    return torch.where(valid.unsqueeze(1), grad * scale, torch.zeros((), dtype=grad.dtype, device=grad.device))


def target_gradient(logits, target, weight, label_smoothing, softcap, row_scale):
    """d loss / d target for class-probability targets: -w_j (1 - eps) log p_j, times the row's scale.

    row_scale: (M,) or () factor (grad_output times the reduction's 1/denominator).
    """
    acc = acc_dtype(logits.dtype)
    z, _ = _softcap(logits.to(acc), softcap)
    logp = z - _logsumexp(z).unsqueeze(1)
    g = -(1.0 - float(label_smoothing)) * logp
    if weight is not None:
        g = g * weight.to(acc)
    if row_scale.dim() == 1:
        row_scale = row_scale.unsqueeze(1)
    return g * row_scale.to(acc)
