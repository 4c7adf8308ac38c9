"""Vocabulary-parallel softmax cross-entropy over ``torch.distributed``.

Each rank holds a contiguous slice of the classes (rank 0 the first slice, and so on; the slices may
differ in size) of the same rows, and the targets hold global class indices. The loss needs only
three numbers per row from the whole vocabulary: the row max, the sum of ``exp(z - max)`` and the
target's logit (plus the sum of the logits for label smoothing). They come from two small
all-reduces of ``(N,)`` and ``(k, N)`` tensors; the ``(N, V)`` logits are never gathered.

The backward needs no communication: with ``lse`` known, each rank's gradient is
``((sum q) + 2 z_loss lse) * softmax(z) - q`` on its own slice, which is exactly the derivative of
the global loss with respect to that slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from torch_xent.reference import REDUCTIONS, acc_dtype


def _world(group):
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def shard_offsets(local_classes: int, device, group=None) -> tuple[int, int]:
    """(first global class of this rank, total number of classes), from an all-gather of the slice sizes."""
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


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """``apply(logits (N, V_local), target (N,) int64, group, ignore_index, reduction, label_smoothing,
    z_loss, start, num_classes)`` -> loss ((N,) or ()) in the logits' dtype, equal on every rank."""

    @staticmethod
    def forward(ctx, logits, target, group, ignore_index, reduction, label_smoothing, z_loss, start, num_classes):
        acc = acc_dtype(logits.dtype)
        z = logits.to(acc)
        n, local = z.shape
        eps = float(label_smoothing)

        # The global max: the shift that keeps exp() in range and the sums exact for large logits.
        m = z.amax(dim=1) if local > 0 else z.new_full((n,), float("-inf"))
        _all_reduce(m, dist.ReduceOp.MAX, group)
        # A row that is -inf everywhere would give (-inf) - (-inf) = NaN; shift it by 0 instead, so that
        # its lse is -inf and the loss inf (or NaN), as F.cross_entropy gives.
        shift = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=acc, device=z.device))
        zs = z - shift.unsqueeze(1)

        valid = target != ignore_index
        local_t = target - start
        mine = valid & (local_t >= 0) & (local_t < local)
        idx = torch.where(mine, local_t, torch.zeros_like(local_t)).clamp_(0, max(local - 1, 0))
        if local > 0:
            zy = torch.where(mine, zs.gather(1, idx.unsqueeze(1)).squeeze(1), torch.zeros((), dtype=acc,
                                                                                             device=z.device))
        else:
            zy = torch.zeros(n, dtype=acc, device=z.device)
        parts = [torch.exp(zs).sum(dim=1), zy]
        if eps > 0:
            parts.append(zs.sum(dim=1))
        stats = _all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)
        log_sum = torch.log(stats[0])
        lse = shift + log_sum
        # sum(q) = 1 for every counted row (no class weights), so loss = lse - sum_j q_j z_j, relative to
        # the shift: log_sum - (1 - eps) (z_y - m) - eps/C sum_j (z_j - m).
        loss = log_sum - (1.0 - eps) * stats[1]
        if eps > 0:
            loss = loss - (eps / num_classes) * stats[2]
        if z_loss:
            loss = loss + z_loss * lse * lse
        zero = torch.zeros((), dtype=acc, device=z.device)
        loss = torch.where(valid, loss, zero)
        lse = torch.where(valid, lse, zero)

        if reduction == "none":
            out = loss
            scale = None
        else:
            out = loss.sum()
            scale = 1.0 / valid.sum().to(acc) if reduction == "mean" else None
            if scale is not None:
                out = out * scale
        ctx.save_for_backward(logits, lse, valid, idx, mine, scale)
        ctx.eps, ctx.z_loss, ctx.num_classes, ctx.reduction = eps, float(z_loss), num_classes, reduction
        return out.to(logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, lse, valid, idx, mine, scale = ctx.saved_tensors
        acc = acc_dtype(logits.dtype)
        z = logits.to(acc)
        p = torch.exp(z - lse.unsqueeze(1))
        coef = 1.0 + 2.0 * ctx.z_loss * lse if ctx.z_loss else None
        grad = p if coef is None else coef.unsqueeze(1) * p
        if ctx.eps > 0:
            grad = grad - ctx.eps / ctx.num_classes
        if grad.shape[1] > 0:
            hit = torch.full((grad.shape[0], 1), -(1.0 - ctx.eps), dtype=acc, device=grad.device)
            grad.scatter_add_(1, idx.unsqueeze(1), hit * mine.unsqueeze(1).to(acc))
        row = grad_output.to(acc)
        if scale is not None:
            row = row * scale
        row = row.unsqueeze(1) if row.dim() == 1 else row
        zero = torch.zeros((), dtype=acc, device=z.device)
        grad = torch.where(valid.unsqueeze(1), grad * row, zero)
        return grad.to(logits.dtype), None, None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits_shard, target, *, group=None, ignore_index=-100, reduction="mean",
                                 label_smoothing=0.0, z_loss=0.0):
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

    Returns the loss, identical on every rank, in the logits' dtype. There are no class weights.
    Every rank must call this with the same rows (it is a collective).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not logits_shard.dtype.is_floating_point:
        raise NotImplementedError("vocab_parallel_cross_entropy: logits must be floating point")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {target.dtype}")
    if logits_shard.dim() < 1 or tuple(target.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must be the logits' shape without the class "
                         f"dimension, {tuple(logits_shard.shape[:-1])}")
    out_shape = target.shape
    logits = logits_shard.reshape(-1, logits_shard.shape[-1]).contiguous()
    tgt = target.reshape(-1).long()
    start, num_classes = shard_offsets(logits.shape[1], logits.device, group)
    if num_classes == 0:
        raise IndexError("vocab_parallel_cross_entropy: the vocabulary is empty on every rank")
    bad = (tgt != ignore_index) & ((tgt < 0) | (tgt >= num_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(tgt[bad][0])} is out of bounds.")
    loss = VocabParallelCrossEntropyFunction.apply(logits, tgt, group, ignore_index, reduction,
                                                   float(label_smoothing), float(z_loss), start, num_classes)
    return loss.reshape(out_shape) if reduction == "none" else loss
