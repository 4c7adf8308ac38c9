"""Vocabulary-parallel softmax cross-entropy over ``torch.distributed``.

Each rank holds a contiguous slice of the classes (rank 0 the first slice, and so on; the slices may
differ in size) of the same rows, and the targets hold global class indices. The loss needs only
three numbers per row from the whole vocabulary: the row max, the sum of ``exp(z - max)`` and the
target's logit (plus the sum of the logits for label smoothing). They come from two small
all-reduces, a MAX of an ``(N,)`` tensor and a SUM of a ``(2, N)`` (``(3, N)`` with label
smoothing) tensor; the ``(N, V)`` logits are never gathered.

The backward of the loss with respect to the logits needs no communication: with ``lse`` known,
each rank's gradient is ``(1 + 2 z_loss lse) * softmax(z) - q`` on its own slice, which is exactly
the derivative of the global loss with respect to that slice.

:func:`vocab_parallel_linear_cross_entropy` also shards the classifier: each rank holds the rows of
``W`` (and ``b``) for its classes, the input is replicated, and the logits are made and consumed
chunk by chunk as in :mod:`torch_xent.linear`. The input's gradient is the sum over the ranks of
``g_r @ W_r``: one all-reduce of ``(N, D)`` at the end.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from torch_xent import _checks
from torch_xent._options import LossOptions, loss_options
from torch_xent.reference import acc_dtype


class Shard(NamedTuple):
    """Where this rank's classes lie: ``group``, first global class ``start``, total ``num_classes``."""

    group: object
    start: int
    num_classes: int


def _world(group):
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def shard_offsets(local_classes: int, device, group=None) -> tuple[int, int]:
    """(first global class of this rank, total number of classes), from an all-gather of the slice
    sizes (one collective and a host synchronisation: pass ``vocab_start`` and ``num_classes`` to
    the loss functions to skip it)."""
    world, rank = _world(group)
    if world == 1:
        return 0, local_classes
    mine = torch.tensor([local_classes], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    sizes = [int(s) for s in sizes]
    return sum(sizes[:rank]), sum(sizes)


def _all_reduce(t, op, group):
    if _world(group)[0] > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _global_rows(z, target, valid, opts: LossOptions, shard: Shard):
    """Per-row statistics over the whole vocabulary from this rank's slice ``z`` (n, V_r), acc dtype.

    Returns (loss (n,), lse (n,), idx (n,), mine (n,)): loss and lse are 0 on ignored rows; ``mine``
    says whether the target class is on this rank and ``idx`` is its local column (0 otherwise).
    Two all-reduces; every rank must call this with the same rows.
    """
    n, local = z.shape
    acc = z.dtype
    eps, z_loss, group = opts.label_smoothing, opts.z_loss, shard.group
    # The global max: the shift that keeps exp() in range and the sums exact for large logits.
    m = z.amax(dim=1) if local > 0 else z.new_full((n,), float("-inf"))
    _all_reduce(m, dist.ReduceOp.MAX, group)
    # A row that is -inf everywhere would give (-inf) - (-inf) = NaN; shift it by 0 instead, so that
    # its lse is -inf and the loss inf (or NaN), as F.cross_entropy gives.
    shift = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=acc, device=z.device))
    zs = z - shift.unsqueeze(1)

    local_t = target - shard.start
    mine = valid & (local_t >= 0) & (local_t < local)
    idx = torch.where(mine, local_t, torch.zeros_like(local_t)).clamp_(0, max(local - 1, 0))
    zero = torch.zeros((), dtype=acc, device=z.device)
    if local > 0:
        zy = torch.where(mine, zs.gather(1, idx.unsqueeze(1)).squeeze(1), zero)
    else:
        zy = torch.zeros(n, dtype=acc, device=z.device)
    parts = [zs.sum(dim=1)] if eps > 0 else []
    zs.exp_()
    parts = [zs.sum(dim=1), zy] + parts
    del zs
    stats = _all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)
    log_sum = torch.log(stats[0])
    lse = shift + log_sum
    # sum(q) = 1 for every counted row (no class weights), so loss = lse - sum_j q_j z_j, relative to
    # the shift: log_sum - (1 - eps) (z_y - m) - eps/C sum_j (z_j - m).
    loss = log_sum - (1.0 - eps) * stats[1]
    if eps > 0:
        loss = loss - (eps / shard.num_classes) * stats[2]
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, zero)
    lse = torch.where(valid, lse, zero)
    return loss, lse, idx, mine


def _local_grad_(z, lse, valid, idx, mine, opts: LossOptions, shard: Shard, row_scale):
    """Overwrites ``z`` (n, V_r), acc dtype, with d loss / d z on this slice, times ``row_scale``
    ((n,) or 0-d), exactly 0 on ignored rows."""
    eps, z_loss = opts.label_smoothing, opts.z_loss
    z.sub_(lse.unsqueeze(1)).exp_()
    if z_loss:
        z.mul_((1.0 + 2.0 * z_loss * lse).unsqueeze(1))
    if eps > 0:
        z.sub_(eps / shard.num_classes)
    if z.shape[1] > 0:
        hit = torch.full((z.shape[0], 1), -(1.0 - eps), dtype=z.dtype, device=z.device)
        z.scatter_add_(1, idx.unsqueeze(1), hit * mine.unsqueeze(1).to(z.dtype))
    row = row_scale.unsqueeze(1) if row_scale.dim() == 1 else row_scale
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    # where, not a multiply: an ignored row's exp(z - 0) may be inf.
    torch.where(valid.unsqueeze(1), z * row, zero, out=z)
    return z


def _mean_scale(valid, reduction, acc):
    if reduction != "mean":
        return None
    return 1.0 / valid.sum().to(acc)


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """``apply(logits (N, V_local), target (N,) int64, opts, shard)`` -> loss ((N,) or ()) in the
    logits' dtype, equal on every rank (``opts`` a LossOptions, ``shard`` a Shard)."""

    @staticmethod
    def forward(ctx, logits, target, opts, shard):
        acc = acc_dtype(logits.dtype)
        valid = target != opts.ignore_index
        loss, lse, idx, mine = _global_rows(logits.to(acc), target, valid, opts, shard)
        scale = _mean_scale(valid, opts.reduction, acc)
        if opts.reduction == "none":
            out = loss
        else:
            out = loss.sum() if scale is None else loss.sum() * scale
        ctx.save_for_backward(logits, lse, valid, idx, mine, scale)
        ctx.opts, ctx.shard = opts, shard
        return out.to(logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, lse, valid, idx, mine, scale = ctx.saved_tensors
        acc = acc_dtype(logits.dtype)
        row = grad_output.to(acc) if scale is None else grad_output.to(acc) * scale
        z = logits.to(acc, copy=True)
        grad = _local_grad_(z, lse, valid, idx, mine, ctx.opts, ctx.shard, row)
        return grad.to(logits.dtype), None, None, None


def _check(target, name, input):
    _checks.check_logits(input, name)
    _checks.check_tensor(target, "target", name)
    _checks.check_class_target_dtype(target)


def _offsets(local, device, group, vocab_start, num_classes):
    if (vocab_start is None) != (num_classes is None):
        raise ValueError("pass both vocab_start and num_classes, or neither (then they are all-gathered)")
    if vocab_start is None:
        vocab_start, num_classes = shard_offsets(local, device, group)
    if not 0 <= vocab_start <= vocab_start + local <= num_classes:
        raise ValueError(f"this rank's classes [{vocab_start}, {vocab_start + local}) do not fit in "
                         f"[0, {num_classes})")
    if num_classes == 0:
        raise IndexError("the vocabulary is empty on every rank")
    return vocab_start, num_classes


def vocab_parallel_cross_entropy(logits_shard, target, *, group=None, ignore_index=-100, reduction="mean",
                                 label_smoothing=0.0, z_loss=0.0, vocab_start=None, num_classes=None):
    """Cross-entropy of logits whose class dimension is split across the ranks of ``group``.

    Args:
        logits_shard: ``(..., V_r)`` this rank's classes, floating point (half types accumulate in
            float32). Rank r holds global classes ``[sum_{k<r} V_k, sum_{k<=r} V_k)``; sizes may differ.
        target: ``(...)`` int64 (or uint8) global class indices in ``[0, V)`` or ``ignore_index``, the
            same on every rank.
        group: the process group (None: the default group; without an initialised process group the
            call is a plain single-process cross-entropy).
        reduction: ``"none"`` (shape of target), ``"mean"`` (over the rows that are not ignored) or ``"sum"``.
        label_smoothing: in ``[0, 1]``, smoothing over the V global classes as ``F.cross_entropy`` does.
        z_loss: coefficient of ``lse**2`` added to each counted row.
        vocab_start, num_classes: this rank's first global class and V. When not given they come
            from an all-gather of the slice sizes (an extra collective and host synchronisation per
            call); any layout of contiguous slices works when they are given.

    Returns the loss, identical on every rank, in the logits' dtype. There are no class weights, and
    no double backward. Every rank must call this with the same rows (it is a collective).
    """
    opts = loss_options(reduction, ignore_index, label_smoothing, z_loss)
    _check(target, "vocab_parallel_cross_entropy", logits_shard)
    if logits_shard.dim() < 1 or tuple(target.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must be the logits' shape without the class "
                         f"dimension, {tuple(logits_shard.shape[:-1])}")
    out_shape = target.shape
    logits = logits_shard.reshape(-1, logits_shard.shape[-1]).contiguous()
    tgt = target.reshape(-1).long()
    start, num_classes = _offsets(logits.shape[1], logits.device, group, vocab_start, num_classes)
    # Without this a bad index would silently be "on no rank" (its logit taken as 0), so it is
    # checked everywhere, at the price of one host synchronisation on the GPU.
    _checks.check_targets_in_range(tgt, num_classes, ignore_index)
    loss = VocabParallelCrossEntropyFunction.apply(logits, tgt, opts, Shard(group, start, num_classes))
    return loss.reshape(out_shape) if reduction == "none" else loss


def _sharded_pass(x, w, b, y, valid, opts: LossOptions, shard: Shard, rows, row_scale, need_x, need_w, need_b):
    """One sweep over row chunks of a vocabulary-sharded linear layer + cross-entropy.

    Returns (row losses (N,) acc, grad_x (N, D) acc (this rank's part, not yet all-reduced),
    grad_w (V_r, D) acc, grad_b (V_r,) acc); gradients only when ``row_scale`` is given.
    """
    n, d = x.shape
    acc = acc_dtype(x.dtype)
    grads = row_scale is not None
    losses = torch.empty(n, dtype=acc, device=x.device)
    gx = torch.zeros(n, d, dtype=acc, device=x.device) if grads and need_x else None
    gw = torch.zeros(w.shape, dtype=acc, device=x.device) if grads and need_w else None
    gb = torch.zeros(w.shape[0], dtype=acc, device=x.device) if grads and need_b else None
    w_acc = w.to(acc) if gx is not None else None
    # Every rank runs the same number of chunks (n is the same everywhere), so the collectives pair up.
    for s in range(0, max(n, 1), rows):
        e = min(n, s + rows)
        xc = x[s:e]
        z = torch.nn.functional.linear(xc, w, b).to(acc)
        loss, lse, idx, mine = _global_rows(z, y[s:e], valid[s:e], opts, shard)
        losses[s:e] = loss
        if not grads:
            continue
        rs = row_scale if row_scale.dim() == 0 else row_scale[s:e]
        g = _local_grad_(z, lse, valid[s:e], idx, mine, opts, shard, rs)
        if gx is not None:
            torch.mm(g, w_acc, out=gx[s:e])
        if gw is not None:
            gw.addmm_(g.t(), xc.to(acc))
        if gb is not None:
            gb += g.sum(dim=0)
    return losses, gx, gw, gb


class VocabParallelLinearCrossEntropyFunction(torch.autograd.Function):
    """``apply(x (N, D) replicated, w (V_r, D), b (V_r,) or None, y (N,) int64, opts, shard, chunk_rows)``
    -> loss, equal on every rank (``opts`` a LossOptions, ``shard`` a Shard)."""

    @staticmethod
    def forward(ctx, x, w, b, y, opts, shard, rows):
        acc = acc_dtype(x.dtype)
        valid = y != opts.ignore_index
        reduction = opts.reduction
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        ctx.opts, ctx.shard, ctx.rows, ctx.need = opts, shard, rows, need
        ctx.save_for_backward(x, w, b, y, valid)
        ctx.buffers = None
        scale = _mean_scale(valid, reduction, acc)
        if reduction == "none":
            losses, *_ = _sharded_pass(x, w, b, y, valid, opts, shard, rows, None, *need)
            return losses.to(x.dtype)
        unit = torch.ones((), dtype=acc, device=x.device) if scale is None else scale
        losses, *buffers = _sharded_pass(x, w, b, y, valid, opts, shard, rows, unit, *need)
        ctx.buffers = buffers
        total = losses.sum()
        return (total if scale is None else total * scale).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, w, b, y, valid = ctx.saved_tensors
        acc = acc_dtype(x.dtype)
        go = grad_output.to(acc)
        reduction = ctx.opts.reduction
        if reduction == "none" or ctx.buffers is None:
            # Per-row grad_output (or a second backward): recompute; the collectives run again, on
            # every rank, since every rank runs this backward.
            if reduction == "none":
                row = go
            else:
                scale = _mean_scale(valid, reduction, acc)
                row = go if scale is None else go * scale
            _, gx, gw, gb = _sharded_pass(x, w, b, y, valid, ctx.opts, ctx.shard, ctx.rows, row, *ctx.need)
        else:
            gx, gw, gb = ctx.buffers
            ctx.buffers = None
            gx, gw, gb = (None if t is None else t.mul_(go) for t in (gx, gw, gb))
        if gx is not None:
            # d loss / d x = sum over the ranks of g_r @ W_r: every rank gets the full input gradient.
            _all_reduce(gx, dist.ReduceOp.SUM, ctx.shard.group)
        cast = (lambda t: None if t is None else t.to(x.dtype))
        return cast(gx), cast(gw), cast(gb), None, None, None, None


def vocab_parallel_linear_cross_entropy(input, weight_shard, target, *, bias_shard=None, group=None,
                                        ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                                        vocab_start=None, num_classes=None, chunk_size=None):
    """``F.cross_entropy(F.linear(input, W, b), target)`` with ``W``'s rows (the classes) split across ranks.

    Args:
        input: ``(..., D)`` features, the same on every rank (replicated); its gradient, summed over
            the ranks with one all-reduce, is the full gradient on every rank.
        weight_shard: ``(V_r, D)`` the rows of W for this rank's classes (rank order, as in
            :func:`vocab_parallel_cross_entropy`); its gradient is this slice of W's gradient.
        target: ``(...)`` global class indices (int64 or uint8), the same on every rank.
        bias_shard: optional ``(V_r,)`` slice of the bias.
        chunk_size: rows per chunk (the (chunk, V_r) logits are the only large temporary); None
            picks :func:`torch_xent.linear.default_chunk_rows` for V_r classes.
        group, ignore_index, reduction, label_smoothing, z_loss, vocab_start, num_classes: as in
            :func:`vocab_parallel_cross_entropy`.

    Returns the loss, identical on every rank, in the input's dtype. Per-chunk statistics and the
    gradients accumulate in float32 for half inputs (the accumulators are float32 copies of the
    gradients). No class weights, no double backward. ``mean``/``sum`` compute the gradients in
    the forward; ``none`` recomputes in the backward.
    """
    from torch_xent.linear import default_chunk_rows

    opts = loss_options(reduction, ignore_index, label_smoothing, z_loss)
    _check(target, "vocab_parallel_linear_cross_entropy", input)
    if weight_shard.dim() != 2 or input.dim() < 1 or input.shape[-1] != weight_shard.shape[1]:
        raise ValueError(f"input (..., D) and weight_shard (V_r, D) disagree: {list(input.shape)} and "
                         f"{list(weight_shard.shape)}")
    if weight_shard.dtype != input.dtype or (bias_shard is not None and bias_shard.dtype != input.dtype):
        raise RuntimeError("vocab_parallel_linear_cross_entropy: weight_shard and bias_shard must have the input's "
                           "dtype")
    if bias_shard is not None and tuple(bias_shard.shape) != (weight_shard.shape[0],):
        raise ValueError(f"bias_shard must have shape ({weight_shard.shape[0]},), got {list(bias_shard.shape)}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target shape {list(target.shape)} must be the input's shape without its last dimension, "
                         f"{list(input.shape[:-1])}")
    _checks.check_chunk_size(chunk_size)
    out_shape = target.shape
    x = input.reshape(-1, input.shape[-1]).contiguous()
    y = target.reshape(-1).long()
    local = weight_shard.shape[0]
    start, num_classes = _offsets(local, x.device, group, vocab_start, num_classes)
    _checks.check_targets_in_range(y, num_classes, ignore_index)
    rows = chunk_size or default_chunk_rows(x.shape[0], max(local, 1), x.dtype)
    loss = VocabParallelLinearCrossEntropyFunction.apply(x, weight_shard, bias_shard, y, opts,
                                                         Shard(group, start, num_classes), max(1, rows))
    return loss.reshape(out_shape) if reduction == "none" else loss
