"""The fast pure-PyTorch implementation (``impl="aten"``): what runs wherever no compiled kernel is used.

It has the contract of the compiled op ``torch_xent::cross_entropy_forward``: one forward computes the
loss, the per-row log-sum-exp and (when asked) the gradient d loss / d logits, which the autograd
Function's backward only scales. It is built from ATen operations, so it runs on any device PyTorch
supports (CPU, CUDA, MPS, XPU, ...), and it works on a chunk of rows at a time:

- each chunk of logits is read from memory once; every later operation on it finds it in cache (on
  the CPU a chunk is about ``CPU_CHUNK_BYTES``) and writes at most a chunk-sized temporary, so the
  temporaries stay within a fixed memory budget whatever the problem size, and the only (M, C) tensor
  is the gradient itself (none with ``inplace``: the gradient overwrites the logits);
- there is no dense (M, C) target distribution: a class target enters the gradient as one
  ``scatter_add_`` per row and label smoothing as a rank-one update;
- the loss is computed from ``log_softmax`` (``z - m - log sum exp(z - m)`` with the row max ``m``),
  so logits of magnitude 1e4 keep their digits, as in the kernels and in PyTorch.

Per row, with q the target distribution (docs/gradient.md)::

    loss = -sum_j q_j logp_j + z_loss * lse**2
    grad = scale * ((sum(q) + 2 z_loss lse) * softmax(z) - q)           (times d softcap / dz)

No host synchronisation on an accelerator: there, a class index outside [0, C) that is not
``ignore_index`` makes its row's loss and gradient NaN (so the reduced loss is NaN) and nothing is
read out of bounds; on the CPU it raises PyTorch's ``IndexError``. Under ``torch.compile`` the whole
problem is one chunk (the compiler fuses the operations and plans their memory itself) and the
targets are handled as on an accelerator (on the CPU also with the asynchronous assertion of
``_checks.check_targets_in_range``).

This file shares no code with ``reference.py``, the readable statement of the same mathematics that
the tests hold it against (and which gives every implementation its double backward).
"""

from __future__ import annotations

import torch

from torch_xent._checks import check_targets_in_range, is_compiling
from torch_xent._options import LossOptions

#: Bytes of logits (in the accumulation dtype) per chunk on the CPU: large enough that the
#: per-operation overhead (a few microseconds) is small against the sweep, small enough that the
#: chunk's temporaries stay in memory that malloc keeps between calls. Above 32 MiB glibc maps every
#: allocation afresh, and it returns a heap top of more than twice its mapping threshold to the
#: system, so larger temporaries are page-faulted in again on every call (0.3 s per GB here).
CPU_CHUNK_BYTES = 32 << 20
#: The same for half-precision logits, whose chunks need two temporaries (the float32 conversion and
#: the log-probabilities): four times smaller, so that both together stay below malloc's limits
#: (measured: 4096 x 1000 bfloat16 forward 9.7 ms with 32 MiB chunks, 2.1 ms with 8 MiB).
CPU_HALF_CHUNK_BYTES = 8 << 20
#: Bytes per chunk on an accelerator, where every operation is a pass over device memory anyway:
#: large chunks (few launches) under a fixed bound on the temporaries.
DEVICE_CHUNK_BYTES = 64 << 20
#: At most this many logits on the CPU with a plain class target: few operations (see _small_forward).
SMALL_ELEMENTS = 1 << 14


#: At most this many logits on the CPU (in eager mode, with PyTorch's own options), the loss is
#: PyTorch's ``F.cross_entropy`` itself (see runs_torch_loss). The tests set it to 0 to hold this
#: file's own code against the oracle at every size.
TORCH_LOSS_ELEMENTS = SMALL_ELEMENTS


def runs_torch_loss(logits, opts: LossOptions, inplace_backward) -> bool:
    """Whether a problem is small enough that the pure-PyTorch path is PyTorch's own loss.

    At a few thousand logits the time of a loss is its per-call overhead, and a Python
    ``autograd.Function`` alone (tens of microseconds for apply, as much again for the engine's round
    trip into Python) costs more than the whole eager ``F.cross_entropy``: no composition of ATen
    operations under a Python Function can keep up, so on the CPU in eager mode the path calls
    ``F.cross_entropy`` (whose C++ autograd formula is the same gradient). The options it lacks
    (z_loss, softcap), the lse (``cross_entropy_with_lse``) and ``inplace_backward`` keep this file's
    fused code; so does torch.compile, where there is no per-call overhead to save, and an
    accelerator, where an out-of-range target must give NaN rather than a device-side assertion.
    """
    return (logits.numel() <= TORCH_LOSS_ELEMENTS and logits.device.type == "cpu" and not opts.z_loss
            and opts.softcap is None and not inplace_backward and not is_compiling())


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _host_reads_allowed(device: torch.device) -> bool:
    """Values may be read on the host: on the CPU (nothing to wait for), outside torch.compile."""
    return device.type == "cpu" and not is_compiling()


def chunk_rows(num_rows: int, num_classes: int, device: torch.device, acc: torch.dtype, half: bool = False) -> int:
    """Rows per chunk: as many as fit the device's budget of (rows, C) accumulation-dtype logits, at
    least 1; ``half``: the logits are half precision (converted per chunk)."""
    if device.type == "cpu":
        budget = CPU_HALF_CHUNK_BYTES if half else CPU_CHUNK_BYTES
    else:
        budget = DEVICE_CHUNK_BYTES
    itemsize = 8 if acc == torch.float64 else 4
    return max(1, min(num_rows, budget // max(1, num_classes * itemsize)))


def cross_entropy_forward(logits, target, weight, opts: LossOptions, compute_grad=True, inplace=False,
                          host_reads=None, need_lse=True):
    """The ``torch_xent::cross_entropy_forward`` op in ATen operations (same inputs and outputs).

    logits: (M, C) contiguous, float16 / bfloat16 / float32 / float64; target: (M,) int64 class
    indices or (M, C) probabilities in the logits' dtype; weight: (C,) in the logits' dtype or None.
    Or K-dim input in its own layout: logits (N, C, S) contiguous, target (N, S) or (N, C, S), and the
    per-row outputs (N, S), M = N * S.
    Returns (loss, lse, grad): loss (M,) for reduction "none", else 0-d, and lse (M,), both in the
    accumulation dtype (float32 for the half types); grad (M, C) in the logits' dtype, empty without
    ``compute_grad``. With ``inplace`` (and ``compute_grad``) the gradient is written into ``logits``
    and ``grad`` is ``logits``.

    host_reads: whether values may be read on the host (a synchronisation on an accelerator). None
    decides: on the CPU outside torch.compile. With False the accelerator behaviour runs anywhere:
    out-of-range targets give NaN rows, ignored rows are masked without looking whether there are any.

    need_lse: False when the caller discards the lse (plain ``cross_entropy``): without z_loss the loss
    and gradient do not need it, and two sweeps of each chunk (the row max and the log-probabilities'
    max) are saved; ``lse`` is then an empty tensor.
    """
    compiling = is_compiling()
    if logits.dim() == 3 and compiling:
        # Under torch.compile one chunk of rows, whose layout change the compiler fuses.
        n, c, s = logits.shape
        rows = logits.transpose(1, 2).reshape(n * s, c)
        tgt = target.transpose(1, 2).reshape(n * s, c) if target.dtype.is_floating_point else target.reshape(-1)
        loss, lse, grad = cross_entropy_forward(rows, tgt, weight, opts, compute_grad, False, host_reads, need_lse)
        if opts.reduction == "none":
            loss = loss.reshape(n, s)
        if lse.numel():
            lse = lse.reshape(n, s)
        if compute_grad:
            grad = grad.reshape(n, s, c).transpose(1, 2)
            grad = logits.copy_(grad) if inplace else grad.contiguous()
        return loss, lse, grad
    positions = logits.dim() == 3  # (N, C, S): K-dim input in its own layout, M = N * S rows
    num_classes = logits.shape[1]
    num_rows = logits.shape[0] * logits.shape[2] if positions else logits.shape[0]
    dtype = logits.dtype
    acc = _acc_dtype(dtype)
    device = logits.device
    host = _host_reads_allowed(device) if host_reads is None else bool(host_reads)
    inplace = inplace and compute_grad
    soft = target.dtype.is_floating_point
    # The same for a forward alone (no gradient) of at most one chunk: ATen's log_softmax is then the
    # whole cost, and these two kernels sweep the logits once where the chunked code adds a dozen
    # per-row operations; its one (M, C) temporary is what the chunk's would be. (Half-precision
    # logits keep the chunked code, whose conversion goes into a reused chunk buffer.)
    elements = num_rows * num_classes
    one_chunk = not compute_grad and dtype == acc and elements * logits.element_size() <= CPU_CHUNK_BYTES
    if (host and not soft and not positions and 0 < elements and (elements <= SMALL_ELEMENTS or one_chunk)
            and not opts.label_smoothing and not opts.z_loss and opts.softcap is None):
        return _small_forward(logits, target, weight, opts, compute_grad, inplace, acc, need_lse)
    need_lse = need_lse or bool(opts.z_loss)
    eps = opts.label_smoothing
    z_loss = opts.z_loss
    zero = torch.zeros((), dtype=acc, device=device)
    w = None if weight is None else weight.to(acc)

    # Per-row target data, O(M): which rows count, the (clamped) class, its weight, the row's scale.
    valid = bad = y = wy = None
    if soft:
        sum_w = None
    else:
        target = target.reshape(-1)  # (N, S) class targets are the (M,) rows' (a view)
        valid = target != opts.ignore_index
        if host:
            y = torch.where(valid, target, 0)
            # One pass over the counted classes (K-dim input has millions of targets): the full check,
            # with the first bad value in its message, only when that pass finds one.
            lo, hi = torch.aminmax(y) if y.numel() else (0, 0)
            if int(lo) < 0 or int(hi) >= num_classes:
                check_targets_in_range(target, num_classes, opts.ignore_index)
        else:  # no host read: an out-of-range class is clamped for the gather and its row made NaN
            if compiling and device.type == "cpu":  # and, as everywhere under compile, an asynchronous assert
                check_targets_in_range(target, num_classes, opts.ignore_index)
            in_range = (target >= 0) & (target < num_classes)
            bad = valid & ~in_range
            y = torch.where(valid & in_range, target, 0)
        if w is not None:
            wy = torch.where(valid, w[y], zero)
        sum_w = float(num_classes) if w is None else w.sum()
    scale = _reduction_scale(opts.reduction, soft, valid, wy, num_rows, acc, device)
    if soft:
        row_scale = None if scale is None else scale.expand(num_rows)
    else:
        row_scale = valid.to(acc) if scale is None else torch.where(valid, scale, zero)
    if bad is not None:  # NaN through the gradient of an out-of-range row
        row_scale = torch.where(bad, float("nan"), row_scale)
    # Ignored rows get an exactly zero gradient even when their logits are not finite.
    zero_ignored = valid is not None and (not host or not bool(valid.all()))

    grad = None
    if compute_grad and not compiling:  # under torch.compile the one chunk's result is the gradient
        grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    rows = num_rows if compiling else chunk_rows(num_rows, num_classes, device, acc, half=dtype != acc)
    # Where the log-probabilities (then the gradient) of a chunk are computed: straight in the
    # gradient buffer when it has the accumulation dtype, is not the logits themselves, and its chunk
    # is rows of contiguous memory.
    direct = compute_grad and not inplace and dtype == acc and not compiling and not positions
    temps = _Temps(rows, num_classes, acc, device, compiling)
    losses, lses = [], []
    # Under torch.compile one chunk, without a loop over symbolic sizes (dynamic=True keeps one graph).
    # (N, C, S) logits: chunks of positions of one batch item, (C, P) views of the logits (and of the
    # gradient and soft target) that _chunk_positions reduces over the classes, dimension 0, with
    # the positions contiguous: nothing of the logits' size is copied or transposed. Items shorter
    # than a quarter of a chunk go several a chunk (below).
    if compiling:
        bounds = [(0, num_rows)]
    elif positions and 0 < logits.shape[2] and 4 * logits.shape[2] <= rows:
        # Short items (a chunk holds several): whole items a chunk, copied to (k * S, C) rows for
        # _chunk (a copy of the chunk, not of the logits), rather than a few positions a chunk.
        per_item = logits.shape[2]
        items = rows // per_item
        bounds = [(i * per_item, min(i + items, logits.shape[0]) * per_item)
                  for i in range(0, logits.shape[0], items)]
    elif positions:
        per_item = logits.shape[2]
        items = 0
        bounds = [(i * per_item + s, i * per_item + min(s + rows, per_item))
                  for i in range(logits.shape[0]) for s in range(0, per_item, rows)]
    else:
        bounds = [(s, min(s + rows, num_rows)) for s in range(0, num_rows, rows)]

    def chunk_of(t, start, end):
        if not positions:
            return t[start:end]
        i, s = divmod(start, logits.shape[2])
        return t[i, :, s:s + end - start]

    def keep(loss_c, lse_c, sl):
        """A chunk's losses (summed, for a reduced loss: no (M,) buffer) and lse: 0 where ignored,
        NaN where the target is out of range."""
        if valid is not None:
            loss_c = torch.where(valid[sl], loss_c, zero)
            if need_lse:
                lse_c = torch.where(valid[sl], lse_c, zero)
        if bad is not None:
            loss_c = torch.where(bad[sl], float("nan"), loss_c)
            if need_lse:
                lse_c = torch.where(bad[sl], float("nan"), lse_c)
        losses.append(loss_c if opts.reduction == "none" else loss_c.sum())
        lses.append(lse_c)

    for start, end in bounds:
        sl = slice(start, end)
        if positions and items:
            i0, i1 = start // per_item, end // per_item

            def rows_of(t):
                return t[i0:i1].transpose(1, 2).reshape(-1, num_classes)
            loss_c, lse_c, grad_c = _chunk(
                rows_of(logits), compute_grad, None, False, temps, opts, soft, rows_of(target) if soft else target[sl],
                None if y is None else y[sl], None if wy is None else wy[sl], w, sum_w,
                None if row_scale is None else row_scale[sl],
                None if not zero_ignored else valid[sl], None if bad is None else bad[sl], eps, z_loss, acc, need_lse)
            if compute_grad:
                grad[i0:i1].copy_(grad_c.view(i1 - i0, per_item, num_classes).transpose(1, 2))
            keep(loss_c, lse_c, sl)
            continue
        loss_c, lse_c, grad_c = (_chunk_positions if positions else _chunk)(
            chunk_of(logits, start, end), compute_grad, None if grad is None else chunk_of(grad, start, end), direct,
            temps, opts, soft, chunk_of(target, start, end) if soft else target[sl],
            None if y is None else y[sl], None if wy is None else wy[sl], w, sum_w,
            None if row_scale is None else row_scale[sl],
            None if not zero_ignored else valid[sl], None if bad is None else bad[sl], eps, z_loss, acc, need_lse)
        keep(loss_c, lse_c, sl)
        if compute_grad and grad is None and grad_c is not None:
            grad = grad_c.to(dtype)

    def joined(parts):
        if not parts:
            return torch.zeros(0, dtype=acc, device=device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    if not need_lse:
        lse = lses[0] if lses else torch.zeros(0, dtype=acc, device=device)
    else:
        lse = joined(lses)
        if positions:
            lse = lse.reshape(logits.shape[0], logits.shape[2])
    if opts.reduction == "none":
        loss = joined(losses)
        if positions:
            loss = loss.reshape(logits.shape[0], logits.shape[2])
    else:
        total = torch.zeros((), dtype=acc, device=device) if not losses else (
            losses[0] if len(losses) == 1 else torch.stack(losses).sum())
        loss = total if opts.reduction == "sum" else total * scale
    if grad is None:
        grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, lse, grad


def _small_forward(logits, target, weight, opts, compute_grad, inplace, acc, need_lse=True):
    """A small problem with a plain class target, on the CPU: the time is the per-operation overhead,
    so it takes the fewest operations, ATen's own log_softmax and nll_loss kernels (with PyTorch's
    target check and message); the (M, C) temporaries are at most SMALL_ELEMENTS."""
    x = logits if logits.dtype == acc else logits.to(acc)
    w = None if weight is None else weight.to(acc)
    code = {"none": 0, "mean": 1, "sum": 2}[opts.reduction]
    lp = torch._log_softmax(x, 1, False)
    loss, total_weight = torch.ops.aten.nll_loss_forward.default(lp, target, w, code, opts.ignore_index)
    if not need_lse and not compute_grad:
        return loss, lp.new_empty(0), logits.new_empty(0)
    valid = target != opts.ignore_index
    ignored = not bool(valid.all())
    if not need_lse:
        lse = lp.new_empty(0)
    else:  # as in _chunk (torch.logsumexp gives inf, not NaN, for a +inf logit)
        lse = x.amax(1) - lp.amax(1)
        if ignored:
            lse = torch.where(valid, lse, 0.0)
    if not compute_grad:
        return loss, lse, logits.new_empty(0)
    upstream = lp.new_ones(loss.shape)
    g = torch.ops.aten.nll_loss_backward.default(upstream, lp, target, w, code, opts.ignore_index, total_weight)
    g = torch._log_softmax_backward_data(g, lp, 1, acc)  # g - softmax * sum(g): (scale * w_y) (p - onehot)
    if ignored:  # exactly 0, even for non-finite logits
        g.masked_fill_(~valid.unsqueeze(1), 0.0)
    if inplace:
        logits.copy_(g)
        return loss, lse, logits
    return loss, lse, (g if g.dtype == logits.dtype else g.to(logits.dtype))


def _reduction_scale(reduction, soft, valid, wy, num_rows, acc, device):
    """1 / the mean's denominator as a 0-d tensor (PyTorch's: the summed weights of the counted rows
    for class indices, the number of rows for probabilities; 0/0 stays NaN), None for "none" / "sum"."""
    if reduction != "mean":
        return None
    if soft:
        return torch.full((), 1.0 / num_rows if num_rows else float("nan"), dtype=acc, device=device)
    denom = valid.sum().to(acc) if wy is None else wy.sum()
    return 1.0 / denom


class _Temps:
    """Chunk-sized scratch buffers, allocated once per call and reused by every chunk (under
    torch.compile none: the compiler plans the memory)."""

    def __init__(self, rows, cols, dtype, device, compiling):
        self.shape, self.dtype, self.device, self.off = (rows, cols), dtype, device, compiling
        self.bufs = {}

    def get(self, name, rows):
        if self.off:
            return None
        buf = self.bufs.get(name)
        if buf is None:
            buf = self.bufs[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return buf[:rows]


def _chunk(z, want_grad, g, direct, temps, opts, soft, t, y, wy, w, sum_w, row_scale, valid, bad, eps, z_loss,
           acc, need_lse=True):
    """One chunk of rows: returns (loss (r,), lse (r,), grad) in ``acc``. With ``want_grad`` the
    chunk's gradient is written into ``g`` (which may be ``z`` itself: the in-place variant) and
    returned; without ``g`` (under torch.compile) it is returned in ``acc``."""
    r, c = z.shape
    if r == 0:
        return z.new_zeros(0, dtype=acc), z.new_zeros(0, dtype=acc), None
    # x: the (soft-capped) logits in the accumulation dtype.
    dcap = None
    if opts.softcap is not None:
        cap = opts.softcap
        x = _into(temps.get("x", r), z, acc)
        x.div_(cap).tanh_()
        dcap = torch.mul(x, x, out=temps.get("dcap", r)) if not temps.off else x * x
        dcap.neg_().add_(1.0)
        x.mul_(cap)
    elif z.dtype != acc:
        x = _into(temps.get("x", r), z, acc)
    else:
        x = z
    lp = g if direct else temps.get("lp", r)
    if lp is None:
        lp = torch._log_softmax(x, 1, False)
    else:
        torch._log_softmax(x, 1, False, out=lp)
    # lp = (x - m) - log sum exp(x - m) is largest, -log sum exp(x - m), at the max: lse without a
    # rounding of m + log_sum in the log-probabilities (amax is several times cheaper than max + argmax).
    lse = x.amax(1) - lp.amax(1) if need_lse else lp.new_empty(0)

    # loss = -sum_j q_j lp_j (+ z-loss); s = sum_j q_j
    if soft:
        q = _into(temps.get("q", r), t, acc)
        if eps:
            q.mul_(1.0 - eps).add_(eps / c)
        if w is not None:
            q.mul_(w)
        s = q.sum(1)
        qlp = torch.mul(q, lp, out=temps.get("qlp", r)) if not temps.off else q * lp
        qlp = torch.where(q != 0, qlp, 0.0)  # a class of probability 0 counts for nothing, even at -inf
        loss = -qlp.sum(1)
    else:
        lp_y = lp.gather(1, y.unsqueeze(1)).squeeze(1)
        target_w = (1.0 - eps) if wy is None else (1.0 - eps) * wy
        loss = -target_w * lp_y
        s = target_w
        if eps:
            smooth = lp.sum(1) if w is None else lp @ w
            loss = loss - (eps / c) * smooth
            s = s + (eps / c) * sum_w
    if z_loss:
        loss = loss + z_loss * lse * lse
    if not want_grad:
        return loss, lse, None

    # grad = row_scale * ((s + 2 z_loss lse) * p - q) * dcap
    coef = s + 2.0 * z_loss * lse if z_loss else s
    coef = coef * row_scale if row_scale is not None else coef  # a tensor (r,): s is one for class targets
    p = lp.exp_()
    p.mul_(coef.unsqueeze(1))
    if soft:
        if row_scale is not None:
            q.mul_(row_scale.unsqueeze(1))
        p.sub_(q)
    else:  # class targets always have a row scale (0 for ignored rows)
        p.scatter_add_(1, y.unsqueeze(1), (-target_w * row_scale).unsqueeze(1))
        if eps:
            if w is None:
                p.sub_(row_scale.unsqueeze(1), alpha=eps / c)
            else:
                p.addr_(row_scale, w, alpha=-eps / c)
    if dcap is not None:
        p.mul_(dcap)
    if valid is not None:  # ignored rows: exactly 0, even for non-finite logits
        p.masked_fill_(~valid.unsqueeze(1), 0.0)
    if bad is not None:
        p.masked_fill_(bad.unsqueeze(1), float("nan"))
    if g is not None and p is not g:
        g.copy_(p)
    return loss, lse, p


def _chunk_positions(z, want_grad, g, direct, temps, opts, soft, t, y, wy, w, sum_w, row_scale, valid, bad, eps,
                     z_loss, acc, need_lse=True):
    """_chunk for a chunk of positions of K-dim input: z, g and soft targets t are (C, P) views (the
    classes S elements apart, the P positions contiguous), the per-position data (P,). The same
    terms as _chunk's, reduced over dimension 0, each relative to the position's max m:
    d = zc - m, lse = m + log sum exp(d), loss = sum_q log sum exp(d) - sum_j q_j d_j (+ z-loss),
    grad = row_scale * (coef * exp(d) / sum exp(d) - q) * dcap. Returns (loss (P,), lse (P,), grad)."""
    c, r = z.shape
    if r == 0:
        return z.new_zeros(0, dtype=acc), z.new_zeros(0, dtype=acc), None
    def scratch(name):  # a (C, P) buffer in the chunk's (rows, C) scratch (None under torch.compile)
        b = temps.get(name, r)
        return None if b is None else b.view(-1)[:c * r].view(c, r)

    buf = scratch("x")
    dcap = None
    if opts.softcap is not None:
        cap = opts.softcap
        x = _into(buf, z, acc)
        x.div_(cap).tanh_()
        dbuf = scratch("dcap")
        dcap = torch.mul(x, x, out=dbuf) if dbuf is not None else x * x
        dcap.neg_().add_(1.0)
        x.mul_(cap)
    else:
        x = z if z.dtype == acc else _into(buf, z, acc)
    m = x.amax(0)
    # d = x - m, then exp(d), in the gradient's chunk where it has the accumulation dtype (and is not
    # the logits themselves), else in scratch.
    if want_grad and g is not None and g.dtype == acc and g.data_ptr() != z.data_ptr():
        d = torch.sub(x, m, out=g)
    elif buf is not None and x is not buf:
        d = torch.sub(x, m, out=buf)
    elif buf is not None:
        d = x.sub_(m)
    else:
        d = x - m
    if soft:
        q = _into(scratch("q"), t, acc)
        if eps:
            q.mul_(1.0 - eps).add_(eps / c)
        if w is not None:
            q.mul_(w.unsqueeze(1))
        sum_q = q.sum(0)
        dot = torch.where(q != 0, q * d, 0.0).sum(0)  # a class of probability 0 counts for nothing
    else:
        target_w = (1.0 - eps) if wy is None else (1.0 - eps) * wy
        sum_q = target_w
        dot = target_w * d.gather(0, y.unsqueeze(0)).squeeze(0)
        if eps:
            smooth = d.sum(0) if w is None else w @ d
            dot = dot + (eps / c) * smooth
            sum_q = sum_q + (eps / c) * sum_w
    e = d.exp_()
    s_ = e.sum(0)
    log_sum = s_.log()
    lse = m + log_sum
    loss = sum_q * log_sum - dot
    if z_loss:
        loss = loss + z_loss * lse * lse
    if not need_lse:
        lse = lse.new_empty(0)
    if not want_grad:
        return loss, lse, None
    coef = sum_q + 2.0 * z_loss * (m + log_sum) if z_loss else sum_q
    coef = coef * row_scale if row_scale is not None else coef
    p = e.mul_((coef / s_).unsqueeze(0))
    if soft:
        if row_scale is not None:
            q.mul_(row_scale.unsqueeze(0))
        p.sub_(q)
    else:
        p.scatter_add_(0, y.unsqueeze(0), (-target_w * row_scale).unsqueeze(0))
        if eps:
            if w is None:
                p.sub_(row_scale.unsqueeze(0), alpha=eps / c)
            else:
                p.addr_(w, row_scale, alpha=-eps / c)
    if dcap is not None:
        p.mul_(dcap)
    if valid is not None:  # ignored positions: exactly 0, even for non-finite logits
        p.masked_fill_(~valid.unsqueeze(0), 0.0)
    if bad is not None:
        p.masked_fill_(bad.unsqueeze(0), float("nan"))
    if g is not None and p is not g:
        g.copy_(p)
    return loss, lse, p


def _into(buf, src, dtype):
    """src converted to ``dtype``, in ``buf`` when one is given (a fresh tensor under torch.compile)."""
    if buf is None:
        return src.to(dtype, copy=True)
    return buf.copy_(src)
