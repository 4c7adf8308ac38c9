"""Fused linear layer + softmax cross-entropy for large vocabularies: the (N, V) logits never exist.

``linear_cross_entropy(x, W, y)`` equals ``F.cross_entropy(F.linear(x, W, b), y)`` in value and in
gradient, but works on chunks of rows. For each chunk of ``c`` rows:

    z  = x_c @ W^T (+ b)                  (c, V) in one reused buffer
    g  = d loss / d z                     the fused kernel overwrites z with it (reduction "sum")
    grad_x[c]  = (g @ W) * s              s = the reduction's row scale, 1/denominator for mean
    grad_W    += g^T @ (x_c * s)          the scale goes on the small (c, D) side, never on (c, V)
    grad_b    += g^T @ s

so forward + backward hold one (c, V) buffer besides the gradients they must return. The chunk
size comes from a memory budget (see :func:`default_chunk_rows`).

For ``mean`` and ``sum`` all three products run in the forward (the gradient does not depend on
anything the backward brings but the scalar grad_output); the backward only multiplies by
grad_output. For ``none`` each row's gradient is scaled by its own grad_output, which is only
known in the backward: the forward computes the losses alone and the backward recomputes the
logits chunk by chunk (four matrix products instead of three, the memory stays bounded).

Half-precision inputs (float16, bfloat16) take the logits and ``grad_x`` from half-precision
matrix products, as ``F.linear`` does, but accumulate ``grad_W`` and ``grad_b`` over the chunks in
float32 and round once. The float32 accumulator shares its storage with the half-precision
gradient that is returned (see :class:`_HalfWeightGrad`), so it costs one extra copy of the weight
in half precision, not two.

Double backward (``create_graph=True``) recomputes everything with differentiable operations
(``reference.row_terms``) on the whole (N, V) logits: it is exact but not memory-lean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_xent import reference
from torch_xent._options import LossOptions
from torch_xent.autograd import fused_forward, is_batched
from torch_xent.reference import acc_dtype

#: Default budget, in bytes, of the (chunk, V) logits buffer when ``chunk_size`` is not given.
CHUNK_BYTES = 32 * 2**20
#: Fewest rows per chunk: below this the ``grad_W`` product (whose reduction dimension is the chunk)
#: is limited by reading and writing the (V, D) accumulator instead of by arithmetic (measured on CPU at
#: N=1024, D=1024, V=128256 float32: 128 rows 1.25x the time of 256 rows; 512 rows no faster than 256).
MIN_CHUNK_ROWS = 256
#: Bytes of the half-precision (block, D) partial product of the grad_W update (and of the float32
#: copy of a (chunk, block) slice of g for the bias).
_HALF_BLOCK_BYTES = 4 * 2**20

_HALF = (torch.float16, torch.bfloat16)


def default_chunk_rows(num_rows: int, num_classes: int, dtype: torch.dtype, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk: as many as fit ``budget_bytes`` of (rows, V) logits, at least
    ``MIN_CHUNK_ROWS`` (and at least 1), at most ``num_rows``, rounded down to a multiple of 16
    above 16 rows so the matrix products see friendly shapes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = max(MIN_CHUNK_ROWS, budget_bytes // max(1, num_classes * itemsize))
    if rows > 16:
        rows -= rows % 16
    return max(1, min(rows, num_rows))


class _HalfWeightGrad:
    """float32 accumulator for a half-precision (V, D) weight gradient, living mostly in the storage
    of the half-precision tensor that is finally returned.

    The returned (V, D) half tensor has the bytes of a (V/2, D) float32 tensor: that is where rows
    [0, V/2) accumulate; rows [V/2, V) accumulate in a separate float32 tensor. ``finish`` rounds the
    first part into the first half of the same bytes, front to back one block at a time (the block
    it writes covers float32 rows that are already read), then the second part after it. Peak: the
    half tensor plus half of a float32 copy, i.e. a float32 accumulator's size; a separate
    accumulator would add the half tensor on top.
    """

    def __init__(self, num_classes, dim, dtype, device):
        self.out = torch.empty(num_classes, dim, dtype=dtype, device=device)
        self.split = num_classes // 2
        lo = self.out.view(-1)[: 2 * self.split * dim].view(torch.float32).view(self.split, dim)
        hi = torch.zeros(num_classes - self.split, dim, dtype=torch.float32, device=device)
        lo.zero_()
        self.parts = [(0, lo), (self.split, hi)]

    def add(self, g, xs, bias_acc, row_scale):
        """acc += g^T @ xs (and bias_acc += g^T @ row_scale), g (c, V) and xs (c, D) half.

        The product runs in half precision (a half GEMM accumulates in float32 inside and is several
        times faster than a float32 one on CPUs with bf16/fp16 instructions) one (block, D) slice at a
        time; each slice is rounded once and added to the float32 accumulator, so the sum over the
        chunks does not lose the low bits of the small per-chunk contributions.
        """
        d = xs.shape[1]
        block = max(256, _HALF_BLOCK_BYTES // (2 * max(d, 1)))
        rows = min(block, max(a.shape[0] for _, a in self.parts))
        tmp = torch.empty(rows, d, dtype=g.dtype, device=g.device)
        # A float32 += half add_ takes TensorIterator's mixed-dtype path, about 6x slower on the CPU than
        # a vectorised half -> float32 copy followed by a float32 add_ (the block stays in cache between).
        tmp32 = torch.empty(rows, d, dtype=torch.float32, device=g.device)
        for start, acc in self.parts:
            for a in range(0, acc.shape[0], block):
                b = min(acc.shape[0], a + block)
                gb = g[:, start + a:start + b].t()
                part, part32 = tmp[: b - a], tmp32[: b - a]
                torch.mm(gb, xs, out=part)
                part32.copy_(part)
                acc[a:b].add_(part32)
                if bias_acc is not None:
                    bias_acc[start + a:start + b].addmv_(gb.float(), row_scale)

    def finish(self, grad_output=None):
        """Rounds (times grad_output, a 0-d tensor or None) into the half tensor and returns it."""
        (_, lo), (_, hi) = self.parts
        self.parts = None
        rows = max(1, 2**20 // max(1, self.out.shape[1]))
        for a in range(0, self.split, rows):
            b = min(self.split, a + rows)
            block = lo[a:b] if grad_output is None else lo[a:b] * grad_output
            self.out[a:b].copy_(block.to(self.out.dtype))
        self.out[self.split:].copy_(hi if grad_output is None else hi * grad_output)
        return self.out

    def value(self, grad_output):
        """Out of place (the state stays usable): for a grad_output batched under vmap."""
        (_, lo), (_, hi) = self.parts
        return (torch.cat([lo, hi]) * grad_output).to(self.out.dtype)


def chunked_pass(x, w, b, y, weight, opts: LossOptions, use_native, rows, row_scale, need_x, need_w, need_b,
                 per_row_loss):
    """One sweep over the row chunks (``opts.reduction`` is not used: the caller reduces).

    x (N, D), w (V, D), b (V,) or None, y (N,) int64, row_scale (N,) acc dtype or None (no gradient).
    Returns (loss, grad_x, grad_w, grad_b): loss is (N,) per-row losses if ``per_row_loss`` else the
    0-d sum of the row losses (acc dtype); grad_w is a tensor or a ``_HalfWeightGrad``; grad_b is in
    the acc dtype; grads not asked for are None.
    """
    n, d = x.shape
    v = w.shape[0]
    dtype, acc = x.dtype, acc_dtype(x.dtype)
    half = dtype in _HALF
    compute_grad = row_scale is not None and (need_x or need_w or need_b)
    grad_x = torch.empty_like(x) if compute_grad and need_x else None
    grad_w = grad_b = None
    if compute_grad and need_w:
        grad_w = _HalfWeightGrad(v, d, dtype, x.device) if half else torch.zeros_like(w)
    if compute_grad and need_b:
        grad_b = torch.zeros(v, dtype=acc, device=x.device)
    losses = torch.empty(n, dtype=acc, device=x.device) if per_row_loss else None
    total = torch.zeros((), dtype=acc, device=x.device)
    buf = torch.empty(min(rows, n), v, dtype=dtype, device=x.device)
    wt = w.t()
    chunk_opts = opts.replace(reduction="none" if per_row_loss else "sum")
    for s in range(0, n, rows):
        e = min(n, s + rows)
        xc, z = x[s:e], buf[: e - s]
        if b is None:
            torch.mm(xc, wt, out=z)
        else:
            torch.addmm(b, xc, wt, out=z)
        loss, _, g = fused_forward(z, y[s:e], weight, chunk_opts, compute_grad, compute_grad, use_native)
        if per_row_loss:
            losses[s:e] = loss
        else:
            total += loss
        if not compute_grad:
            continue
        rs = row_scale[s:e]
        if grad_x is not None:
            gx = grad_x[s:e]
            torch.mm(g, w, out=gx)
            gx.mul_(rs.unsqueeze(1))
        if half:
            if grad_w is not None:
                grad_w.add(g, (xc.float() * rs.unsqueeze(1)).to(dtype), grad_b, rs)
            elif grad_b is not None:
                grad_b.addmv_(g.t().float(), rs)
        else:
            if grad_w is not None:
                grad_w.addmm_(g.t(), xc * rs.unsqueeze(1))
            if grad_b is not None:
                grad_b.addmv_(g.t(), rs)
    return (losses if per_row_loss else total), grad_x, grad_w, grad_b


def _unit_row_scale(y, weight, opts, n, acc):
    """(N,) d reduced loss / d row loss for grad_output = 1: the mean's 1/denominator (1 for sum) on
    counted rows and exactly 0 on ignored ones (even when 1/denominator is inf: every row ignored)."""
    scale = reference.reduction_scale(y, weight, opts, n, acc)
    valid = y != opts.ignore_index
    return torch.where(valid, scale, torch.zeros((), dtype=acc, device=y.device)), scale


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``apply(x (N, D), w (V, D), b (V,) or None, y (N,) int64, weight (V,) or None, opts, chunk_rows,
    use_native)`` -> loss, (N,) or (), in x's dtype (``opts`` a :class:`torch_xent.LossOptions`). See
    the module docstring for the algorithm."""

    @staticmethod
    def forward(ctx, x, w, b, y, weight, opts, chunk_rows, use_native):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b is not None and ctx.needs_input_grad[2]
        n = x.shape[0]
        acc = acc_dtype(x.dtype)
        ctx.opts, ctx.use_native, ctx.rows, ctx.needs = opts, use_native, chunk_rows, (need_x, need_w, need_b)
        ctx.buffers = None
        ctx.save_for_backward(x, w, b, y, weight)
        if opts.reduction == "none":
            losses, *_ = chunked_pass(x, w, b, y, weight, opts, use_native, chunk_rows, None, False, False, False,
                                      True)
            return losses.to(x.dtype)
        unit, scale = _unit_row_scale(y, weight, opts, n, acc)
        total, gx, gw, gb = chunked_pass(x, w, b, y, weight, opts, use_native, chunk_rows, unit, need_x, need_w,
                                         need_b, False)
        ctx.buffers = (gx, gw, gb)
        return (total * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, w, b, y, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs
        need_x, need_w = need_x and ctx.needs_input_grad[0], need_w and ctx.needs_input_grad[1]
        need_b = need_b and ctx.needs_input_grad[2]
        batched = is_batched(grad_output)
        reduction = ctx.opts.reduction
        if torch.is_grad_enabled() or (batched and reduction == "none"):
            gx, gw, gb = _differentiable_grads(ctx, x, w, b, y, weight, grad_output, need_x, need_w, need_b)
        elif reduction == "none":
            row_scale = torch.where(y != ctx.opts.ignore_index, grad_output.to(acc_dtype(x.dtype)),
                                    torch.zeros((), dtype=acc_dtype(x.dtype), device=x.device))
            with torch.no_grad():
                _, gx, gw, gb = chunked_pass(x, w, b, y, weight, ctx.opts, ctx.use_native, ctx.rows, row_scale,
                                             need_x, need_w, need_b, False)
            gw = gw.finish() if isinstance(gw, _HalfWeightGrad) else gw
            gb = None if gb is None else gb.to(x.dtype)
        else:
            gx, gw, gb = _take_scaled_buffers(ctx, x, w, b, y, weight, grad_output, batched)
        return (gx if need_x else None, gw if need_w else None, gb if need_b else None,
                None, None, None, None, None)


def _take_scaled_buffers(ctx, x, w, b, y, weight, grad_output, batched):
    """mean / sum: the gradients the forward computed for grad_output = 1, times grad_output. They
    are handed over (the Function keeps no reference) unless grad_output is batched under vmap."""
    buffers = ctx.buffers
    if not batched:
        ctx.buffers = None
    if buffers is None:
        # A second backward through the same graph: recompute exactly what the forward computed,
        # so that every backward gives bit-identical gradients.
        unit, _ = _unit_row_scale(y, weight, ctx.opts, x.shape[0], acc_dtype(x.dtype))
        need_x, need_w, need_b = ctx.needs
        with torch.no_grad():
            _, *buffers = chunked_pass(x, w, b, y, weight, ctx.opts, ctx.use_native, ctx.rows, unit, need_x, need_w,
                                       need_b, False)
    gx, gw, gb = buffers
    go = grad_output
    if batched:
        gx = None if gx is None else gx * go.to(gx.dtype)
        gw = None if gw is None else (gw.value(go) if isinstance(gw, _HalfWeightGrad) else gw * go.to(gw.dtype))
        gb = None if gb is None else (gb * go).to(x.dtype)
        return gx, gw, gb
    # On the CPU a grad_output of exactly 1 (loss.backward()) spares a pass over the (V, D) gradient;
    # on the GPU we never read it on the host (that would synchronise).
    one = go.device.type == "cpu" and float(go) == 1.0
    if gx is not None and not one:
        gx.mul_(go.to(gx.dtype))
    if isinstance(gw, _HalfWeightGrad):
        gw = gw.finish(None if one else go.float())
    elif gw is not None and not one:
        gw.mul_(go.to(gw.dtype))
    if gb is not None:
        gb = (gb if one else gb * go).to(x.dtype)
    return gx, gw, gb


def _differentiable_grads(ctx, x, w, b, y, weight, grad_output, need_x, need_w, need_b):
    """The gradients as differentiable functions of x, w, b and grad_output (double backward), on the
    whole (N, V) logits."""
    logits = F.linear(x, w, b)
    _, _, g, valid = reference.row_terms(logits, y, weight, ctx.opts)
    scale = reference.reduction_scale(y, weight, ctx.opts, x.shape[0], g.dtype)
    gl = reference.scale_rows(g, scale * grad_output.to(g.dtype), valid).to(x.dtype)
    gx = gl @ w if need_x else None
    gw = gl.t() @ x if need_w else None
    gb = gl.sum(0) if need_b else None
    return gx, gw, gb
