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

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from torch_xent import reference
from torch_xent._checks import is_compiling
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


class LinearProblem(NamedTuple):
    """What the chunked sweep needs to know besides the tensors and the loss options.

    The tensors it takes: x (N, D); w (C * P, D) whose rows are ordered (class, position), as
    ``linear_weight.reshape(C * P, D)`` orders them; b (C * P,) or None; the target as (N * P,)
    int64 class indices ordered (row, position), or (N, C, P) class probabilities.
    """

    num_classes: int  # C
    positions: int  # P = prod(out_features): 1 for a plain classifier
    soft: bool  # class probabilities instead of class indices
    chunk_rows: int
    kernel: str  # what turns each chunk's logits into loss and gradient: "native", "aten" or "reference"
    half_acc_float32: bool  # half inputs: grad_W / grad_b accumulate over the chunks in float32


def _class_rows(z, num_classes, positions):
    """(m, C * P) logits of m rows, (class, position) ordered, as (m * P, C) rows of classes: the same
    tensor when P = 1, else a (chunk-sized) copy."""
    if positions == 1:
        return z
    m = z.shape[0]
    return z.reshape(m, num_classes, positions).transpose(1, 2).reshape(m * positions, num_classes).contiguous()


def _to_class_position_(out, g, num_classes, positions):
    """Writes (m * P, C) rows ``g`` into ``out`` viewed as (m, C, P)."""
    m = out.shape[0]
    out.view(m, num_classes, positions).copy_(g.view(m, positions, num_classes).transpose(1, 2))


def chunked_pass(x, w, b, y, weight, opts: LossOptions, prob: LinearProblem, row_scale, needs, per_row_loss):
    """One sweep over the row chunks (``opts.reduction`` is not used: the caller reduces).

    row_scale: (N * P,) acc dtype, the factor of each row's gradient, or None (no gradient).
    needs: (grad_x, grad_w, grad_b, grad_target) wanted.
    Returns (loss, grad_x, grad_w, grad_b, grad_target): loss is (N * P,) per-row losses if
    ``per_row_loss`` else the 0-d sum of the row losses (acc dtype); grad_w is a tensor or a
    ``_HalfWeightGrad``; grad_b is in the accumulation dtype; grads not asked for are None.
    """
    need_x, need_w, need_b, need_t = needs
    n, d = x.shape
    c_cls, p = prob.num_classes, prob.positions
    v = w.shape[0]
    dtype, acc = x.dtype, acc_dtype(x.dtype)
    half_acc = dtype in _HALF and prob.half_acc_float32
    grad_z = row_scale is not None and (need_x or need_w or need_b)
    grad_x = torch.empty_like(x) if grad_z and need_x else None
    grad_w = grad_b = None
    if grad_z and need_w:
        grad_w = _HalfWeightGrad(v, d, dtype, x.device) if half_acc else torch.zeros_like(w)
    if grad_z and need_b:
        grad_b = torch.zeros(v, dtype=acc if dtype not in _HALF or half_acc else dtype, device=x.device)
    grad_t = torch.empty_like(y) if row_scale is not None and need_t else None
    losses = torch.empty(n * p, dtype=acc, device=x.device) if per_row_loss else None
    total = torch.zeros((), dtype=acc, device=x.device)
    rows = prob.chunk_rows
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
        zr = _class_rows(z, c_cls, p)
        yr = _class_rows(y[s:e].reshape(e - s, v), c_cls, p) if prob.soft else y[s * p:e * p]
        rs = None if row_scale is None else row_scale[s * p:e * p]
        if grad_t is not None:  # before the kernel overwrites the logits with their gradient
            gt = reference.target_gradient(zr, yr, weight, opts.label_smoothing, opts.softcap, rs).to(dtype)
            _to_class_position_(grad_t[s:e], gt, c_cls, p)
        loss, _, g = fused_forward(zr, yr, weight, chunk_opts, grad_z, grad_z, prob.kernel)
        if per_row_loss:
            losses[s * p:e * p] = loss
        else:
            total += loss
        if not grad_z:
            continue
        if p > 1:  # each (row, position) has its own scale: apply it here, then back to z's layout
            g.mul_(rs.unsqueeze(1).to(g.dtype))
            _to_class_position_(z, g, c_cls, p)
            g, rs = z, None
        _accumulate(g, xc, w, rs, grad_x[s:e] if grad_x is not None else None, grad_w, grad_b)
    return (losses if per_row_loss else total), grad_x, grad_w, grad_b, grad_t


def _accumulate(g, xc, w, rs, gx, grad_w, grad_b):
    """gx = (g @ W) * rs; grad_W += g^T @ (x_c * rs); grad_b += g^T @ rs, for one chunk. ``rs`` is the
    (c,) row scale, or None when ``g`` is already scaled; the scale goes on the small (c, D) side."""
    dtype = xc.dtype
    if gx is not None:
        torch.mm(g, w, out=gx)
        if rs is not None:
            gx.mul_(rs.unsqueeze(1).to(gx.dtype))
    if rs is None:
        xs, rs = xc, torch.ones(g.shape[0], dtype=acc_dtype(dtype), device=g.device)
    elif grad_w is None:
        xs = None
    elif dtype in _HALF:
        xs = (xc.float() * rs.unsqueeze(1)).to(dtype)
    else:
        xs = xc * rs.unsqueeze(1)
    if isinstance(grad_w, _HalfWeightGrad):
        grad_w.add(g, xs, grad_b, rs)
        return
    if grad_w is not None:
        grad_w.addmm_(g.t(), xs)
    if grad_b is not None:
        gt = g.t() if grad_b.dtype == g.dtype else g.t().to(grad_b.dtype)
        grad_b.addmv_(gt, rs.to(grad_b.dtype))


def _unit_row_scale(y, weight, opts, prob, n, acc):
    """(N * P,) d reduced loss / d row loss for grad_output = 1, and the reduction's scale: the mean's
    1/denominator (1 for sum) on counted rows and exactly 0 on ignored ones (even when 1/denominator
    is inf: every row ignored)."""
    scale = reference.reduction_scale(y, weight, opts, n * prob.positions, acc)
    if prob.soft:
        return scale.expand(n * prob.positions), scale
    return torch.where(y != opts.ignore_index, scale, torch.zeros((), dtype=acc, device=y.device)), scale


def _finish(gw):
    return gw.finish() if isinstance(gw, _HalfWeightGrad) else gw


def _empty_for_none(t, like):
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("torch_xent::linear_cross_entropy_chunked", mutates_args=())
def _chunked_op(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: torch.Tensor,
                weight: Optional[torch.Tensor], row_scale: Optional[torch.Tensor], reduction: str, ignore_index: int,
                label_smoothing: float, z_loss: float, softcap: float, num_classes: int, positions: int, soft: bool,
                chunk_rows: int, kernel: str, half_acc_float32: bool, need_x: bool, need_w: bool, need_b: bool,
                need_t: bool, per_row_loss: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """:func:`chunked_pass` as one opaque op for torch.compile (the chunk loop is not traced, so
    the graph does not depend on the number of rows); missing gradients come back empty."""
    opts = LossOptions(reduction, ignore_index, label_smoothing, z_loss, softcap or None)
    prob = LinearProblem(num_classes, positions, soft, chunk_rows, kernel, half_acc_float32)
    loss, gx, gw, gb, gt = chunked_pass(x, w, b, y, weight, opts, prob, row_scale, (need_x, need_w, need_b, need_t),
                                        per_row_loss)
    gw = _finish(gw)
    gb = None if gb is None else gb.to(x.dtype)
    return loss, _empty_for_none(gx, x), _empty_for_none(gw, x), _empty_for_none(gb, x), _empty_for_none(gt, x)


@_chunked_op.register_fake
def _(x, w, b, y, weight, row_scale, reduction, ignore_index, label_smoothing, z_loss, softcap, num_classes,
      positions, soft, chunk_rows, kernel, half_acc_float32, need_x, need_w, need_b, need_t, per_row_loss):
    acc = acc_dtype(x.dtype)
    loss = x.new_empty((x.shape[0] * positions,) if per_row_loss else (), dtype=acc)
    grads = row_scale is not None

    def maybe(flag, like):
        return torch.empty_like(like) if grads and flag and like is not None else x.new_empty(0)

    return loss, maybe(need_x, x), maybe(need_w, w), maybe(need_b, b), maybe(need_t and soft, y)


def _sweep(x, w, b, y, weight, opts, prob, row_scale, needs, per_row_loss, compiled):
    """chunked_pass in eager mode; under torch.compile the same through the opaque op (whose
    gradients are finished tensors, in the input's dtype)."""
    if not compiled:
        return chunked_pass(x, w, b, y, weight, opts, prob, row_scale, needs, per_row_loss)
    out = _chunked_op(x, w, b, y, weight, row_scale, opts.reduction, opts.ignore_index, opts.label_smoothing,
                      opts.z_loss, opts.softcap_value, prob.num_classes, prob.positions, prob.soft, prob.chunk_rows,
                      prob.kernel, prob.half_acc_float32, *needs, per_row_loss)
    loss, *grads = out
    return (loss, *[g if need and row_scale is not None else None for g, need in zip(grads, needs)])


def no_grad_loss(x, w, b, y, weight, opts, prob):
    """The reduced loss (acc dtype) without any gradient work."""
    n = x.shape[0]
    with torch.no_grad():
        total, *_ = _sweep(x, w, b, y, weight, opts, prob, None, (False,) * 4, opts.reduction == "none",
                           is_compiling())
        if opts.reduction == "mean":
            total = total * reference.reduction_scale(y, weight, opts, n * prob.positions, total.dtype)
    return total


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``apply(x (N, D), w (C * P, D), b (C * P,) or None, y, weight (C,) or None, opts, prob,
    allow_retain_graph)`` -> loss, (N * P,) or (), in x's dtype (``opts`` a
    :class:`torch_xent.LossOptions`, ``prob`` a :class:`LinearProblem` that says how y is laid
    out). See the module docstring for the algorithm."""

    @staticmethod
    def forward(ctx, x, w, b, y, weight, opts, prob, allow_retain_graph):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b is not None and ctx.needs_input_grad[2]
        need_t = prob.soft and ctx.needs_input_grad[3]
        needs = (need_x, need_w, need_b, need_t)
        compiled = is_compiling()
        ctx.opts, ctx.prob, ctx.needs, ctx.allow_retain = opts, prob, needs, allow_retain_graph
        ctx.compiled, ctx.buffers, ctx.taken = compiled, None, False
        n = x.shape[0]
        if opts.reduction == "none":
            ctx.save_for_backward(x, w, b, y, weight)
            losses, *_ = _sweep(x, w, b, y, weight, opts, prob, None, (False,) * 4, True, compiled)
            return losses.to(x.dtype)
        unit, scale = _unit_row_scale(y, weight, opts, prob, n, acc_dtype(x.dtype))
        total, *buffers = _sweep(x, w, b, y, weight, opts, prob, unit, needs, False, compiled)
        if compiled:  # dynamo wants every tensor the backward reads in save_for_backward
            ctx.save_for_backward(x, w, b, y, weight, *buffers)
        else:
            ctx.save_for_backward(x, w, b, y, weight)
            ctx.buffers = buffers
        return (total * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, w, b, y, weight, *saved = ctx.saved_tensors
        needs = tuple(need and ctx.needs_input_grad[i] for i, need in enumerate(ctx.needs))
        batched = not ctx.compiled and is_batched(grad_output)
        reduction = ctx.opts.reduction
        if torch.is_grad_enabled() or (batched and reduction == "none"):
            grads = _differentiable_grads(ctx, x, w, b, y, weight, grad_output, needs)
        elif reduction == "none":
            acc = acc_dtype(x.dtype)
            go = grad_output.reshape(-1).to(acc)
            row_scale = go if ctx.prob.soft else torch.where(y != ctx.opts.ignore_index, go,
                                                             torch.zeros((), dtype=acc, device=x.device))
            with torch.no_grad():
                _, *grads = _sweep(x, w, b, y, weight, ctx.opts, ctx.prob, row_scale, needs, False, ctx.compiled)
            grads = [_finish(g) for g in grads]
            grads[2] = None if grads[2] is None else grads[2].to(x.dtype)
        else:
            grads = _take_scaled_buffers(ctx, x, w, b, y, weight, saved, grad_output, batched, needs)
        grads = [g if need else None for g, need in zip(grads, needs)]
        return (*grads, None, None, None, None)


def _take_scaled_buffers(ctx, x, w, b, y, weight, saved, grad_output, batched, needs):
    """mean / sum: the gradients the forward computed for grad_output = 1, times grad_output. In eager
    mode they are handed over (the Function keeps no reference) unless grad_output is batched under
    vmap; a second backward recomputes them (or raises, as PyTorch's chunked path does, when
    ``options.allow_retain_graph`` is False)."""
    go = grad_output
    if ctx.compiled:
        return [None if t is None else t * go.to(t.dtype) for t in saved]
    buffers = ctx.buffers
    if not batched:
        ctx.buffers = None
    if buffers is None:
        if not ctx.allow_retain:
            raise RuntimeError("linear_cross_entropy: a second backward through the same graph needs "
                               "options=torch.nn.LinearCrossEntropyOptions(allow_retain_graph=True) (or options=None)")
        # Recompute exactly what the forward computed, so that every backward gives bit-identical gradients.
        unit, _ = _unit_row_scale(y, weight, ctx.opts, ctx.prob, x.shape[0], acc_dtype(x.dtype))
        with torch.no_grad():
            _, *buffers = chunked_pass(x, w, b, y, weight, ctx.opts, ctx.prob, unit, ctx.needs, False)
    gx, gw, gb, gt = buffers
    if batched:
        gx = None if gx is None else gx * go.to(gx.dtype)
        gw = None if gw is None else (gw.value(go) if isinstance(gw, _HalfWeightGrad) else gw * go.to(gw.dtype))
        gb = None if gb is None else (gb * go).to(x.dtype)
        gt = None if gt is None else gt * go.to(gt.dtype)
        return gx, gw, gb, gt
    # On the CPU a grad_output of exactly 1 (loss.backward()) spares a pass over the (V, D) gradient;
    # on the GPU we never read it on the host (that would synchronise).
    one = go.device.type == "cpu" and float(go) == 1.0
    for t in (gx, gt):
        if t is not None and not one:
            t.mul_(go.to(t.dtype))
    if isinstance(gw, _HalfWeightGrad):
        gw = gw.finish(None if one else go.float())
    elif gw is not None and not one:
        gw.mul_(go.to(gw.dtype))
    if gb is not None:
        gb = (gb if one else gb * go).to(x.dtype)
    return gx, gw, gb, gt


def _differentiable_grads(ctx, x, w, b, y, weight, grad_output, needs):
    """The gradients as differentiable functions of x, w, b, the soft target and grad_output (double
    backward), on the whole (N, C * P) logits."""
    need_x, need_w, need_b, need_t = needs
    prob, opts = ctx.prob, ctx.opts
    n, c_cls, p = x.shape[0], prob.num_classes, prob.positions
    z = _class_rows(F.linear(x, w, b), c_cls, p)
    yr = _class_rows(y.reshape(n, c_cls * p), c_cls, p) if prob.soft else y
    _, _, g, valid = reference.row_terms(z, yr, weight, opts)
    scale = reference.reduction_scale(yr, weight, opts, n * p, g.dtype)
    row_scale = scale * grad_output.reshape(-1).to(g.dtype) if grad_output.dim() else scale * grad_output.to(g.dtype)
    gl = reference.scale_rows(g, row_scale, valid).to(x.dtype)
    if p > 1:
        gl = gl.reshape(n, p, c_cls).transpose(1, 2).reshape(n, c_cls * p)
    gx = gl @ w if need_x else None
    gw = gl.t() @ x if need_w else None
    gb = gl.sum(0) if need_b else None
    gt = None
    if need_t:
        gt = reference.target_gradient(z, yr, weight, opts.label_smoothing, opts.softcap, row_scale)
        gt = gt.reshape(n, p, c_cls).transpose(1, 2).reshape(y.shape).to(y.dtype)
    return gx, gw, gb, gt


def chunk_rows_for(options, chunk_size, num_rows, in_features, num_classes, dtype) -> int:
    """Rows per chunk: torch_xent's ``chunk_size`` if given, else ``options.batch_chunk_size``, else
    ``options.chunking_method`` "aspect_ratio[:k]" as PyTorch computes it (the (chunk, V) logits
    about as large as the (N, D) input, divided by k), else :func:`default_chunk_rows`."""
    rows = chunk_size
    if rows is None and options is not None:
        rows = options.batch_chunk_size
        method = options.chunking_method
        if method not in (None, "auto"):
            _, _, factor = method.partition(":")
            ratio = -(-num_classes // max(1, in_features))
            target = max(1, -(-num_rows // ratio))
            by_method = min(max(1, (1 << (target - 1).bit_length()) // int(factor or 1)), max(1, num_rows))
            if rows is not None and rows != by_method:
                raise ValueError(f"batch_chunk_size (={rows}) and chunking_method ('{method}') give different "
                                 f"chunk sizes ({rows} vs {by_method}); pass only one.")
            rows = by_method
    if rows is None:
        rows = default_chunk_rows(num_rows, num_classes, dtype)
    return max(1, min(rows, max(1, num_rows)))


def half_accumulates_in_float32(options, dtype) -> bool:
    """Half inputs accumulate grad_W and grad_b over the chunks in float32 unless ``options.acc_dtype``
    is the input's own dtype (PyTorch's lower-memory choice)."""
    acc = None if options is None else options.acc_dtype
    return not (dtype in _HALF and acc == dtype)


# The public function lives in functional.py with cross_entropy; this name keeps `from torch_xent.linear
# import linear_cross_entropy` working.
from torch_xent.functional import linear_cross_entropy  # noqa: E402,F401
