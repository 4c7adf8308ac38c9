"""Test helpers shared by every test file: one problem factory, one tolerance table, one oracle built
from torch.nn.functional, one comparison of op outputs with torch_xent.reference, a free port.

The oracle (:func:`expected_loss`) is ``F.cross_entropy`` plus the closed forms of torch_xent's two
extensions (z-loss, softcap): it shares no code with torch_xent, so it can catch a mistake in the
reference too.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import socket

import torch
import torch.nn.functional as F

from torch_xent import reference
from torch_xent._options import LossOptions

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF = (torch.float16, torch.bfloat16)

# (rtol, atol) by dtype and by what is compared:
# - "value": a result in the input's dtype against an oracle computed in float32/float64;
# - "acc": loss / lse in the accumulation dtype (float32 for the half types) against the reference;
#   atol grows with log(C), the size of a row's loss;
# - "grad": a gradient in the input's dtype against the reference's (entries ~1/C or smaller);
# - "matmul": results of matrix products (linear + cross-entropy), whose sums round differently.
TOL = {
    torch.float64: {"value": (1e-9, 1e-10), "acc": (1e-10, 1e-12), "grad": (1e-9, 1e-12), "matmul": (1e-10, 1e-10)},
    torch.float32: {"value": (2e-5, 2e-6), "acc": (2e-5, 2e-6), "grad": (2e-5, 1e-6), "matmul": (1e-4, 2e-5)},
    torch.bfloat16: {"value": (2e-2, 2e-2), "acc": (2e-5, 2e-6), "grad": (1.6e-2, 1e-5), "matmul": (3e-2, 3e-2)},
    torch.float16: {"value": (5e-3, 5e-3), "acc": (2e-5, 2e-6), "grad": (2e-3, 1e-6), "matmul": (5e-3, 5e-3)},
}


def assert_close(actual, expected, dtype, msg="", kind="value", num_classes=None):
    """torch.testing.assert_close in float64 with TOL[dtype][kind]; NaN must match NaN."""
    rtol, atol = TOL[dtype][kind]
    if kind == "acc" and num_classes:
        atol *= max(1.0, math.log(num_classes + 1))
    torch.testing.assert_close(actual.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64),
                               rtol=rtol, atol=atol, equal_nan=True, msg=msg or None)


def make_targets(shape, num_classes, gen, ignore_index=None, ignore_frac=0.3):
    """int64 class indices of ``shape`` in [0, C), a fraction of them set to ``ignore_index``."""
    t = torch.randint(0, num_classes, tuple(shape), generator=gen)
    if ignore_index is not None and t.numel():
        t[torch.rand(tuple(shape), generator=gen) < ignore_frac] = ignore_index
    return t


def make_problem(shape, dtype=torch.float64, device="cpu", opts=None, seed=0):
    """Random (logits, target, class weights) for ``F.cross_entropy``'s layouts.

    shape: the logits' shape, classes in dimension 1 ((C,) for unbatched input). ``opts`` keys:
    - soft: class probabilities of the logits' shape instead of class indices;
    - weight: (C,) class weights in [0.25, 1.25);
    - ignore_index: that value replaces a fraction ``ignore_frac`` (0.3) of the class indices;
    - scale: logits are standard normal times this (3.0);
    - layout "transpose": a 2-D non-contiguous view (the transpose of a contiguous tensor);
    - shift: the storage of logits, target and weight starts this many elements in (misaligned).
    Everything is drawn in float64 on the CPU from ``seed`` (an int, or a CPU torch.Generator whose
    stream goes on across calls), then cast and moved.
    """
    opts = opts or {}
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    class_dim = 0 if len(shape) == 1 else 1
    c = shape[class_dim]
    shift = opts.get("shift", 0)
    scale = opts.get("scale", 3.0)

    def placed(t):  # the same values, starting `shift` elements into a larger storage
        if not shift:
            return t.to(device)
        flat = torch.cat([torch.zeros(shift, dtype=t.dtype), t.reshape(-1)]).to(device)
        return flat[shift:].view(t.shape)

    if opts.get("layout") == "transpose":
        logits = (torch.randn(shape[::-1], generator=gen, dtype=torch.float64) * scale).to(dtype).to(device).t()
    else:
        logits = placed((torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype))
    if opts.get("soft"):
        target = placed(torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), class_dim).to(dtype))
    else:
        n_shape = tuple(s for i, s in enumerate(shape) if i != class_dim)
        target = make_targets(n_shape, c, gen, opts.get("ignore_index"), opts.get("ignore_frac", 0.3)).to(device)
    weight = None
    if opts.get("weight"):
        weight = placed((torch.rand(c, generator=gen, dtype=torch.float64) + 0.25).to(dtype))
    return logits, target, weight


def edge_value_problem(c, dtype, device="cpu"):
    """(logits (9, C), target (9,)) whose rows are the edge values: 0 a +inf logit (NaN row), 1 a NaN
    (NaN row), 2 all -inf (NaN row), 3 -inf at a non-target class (finite, gradient 0 there), 4 -inf
    at the target (inf loss), 5 an ignored row of NaN (counts for nothing, gradient 0), 6 logits of
    magnitude 1e4 (1e3 in float16), 7-8 ordinary rows. C >= 6."""
    gen = torch.Generator().manual_seed(c)  # fixed: the same rows whatever ran before
    logits = torch.randn(9, c, generator=gen, dtype=torch.float64).to(dtype)
    target = torch.randint(0, c, (9,), generator=gen)
    logits[0, 5] = float("inf")
    logits[1, 3] = float("nan")
    logits[2, :] = float("-inf")
    target[3] = 1
    logits[3, 4] = float("-inf")
    target[4] = 2
    logits[4, 2] = float("-inf")
    target[5] = -100
    logits[5, :] = float("nan")
    logits[6] = logits[6].double().mul(1e4).to(dtype) if dtype != torch.float16 else logits[6] * 1e3
    return logits.to(device), target.to(device)


def minus_inf_chunks_problem(dtype, device="cpu"):
    """(logits (4, 6000), target, weight): rows whose first 4500 logits are -inf (whole chunks of it),
    row 1 shifted by +1e4 and row 2 by -1e4 (exact in float32), row 0's target past the -inf part."""
    logits, target, weight = make_problem((4, 6000), dtype, device, {"weight": True})
    logits[:, :4500] = float("-inf")
    logits[1] += 10000.0
    logits[2] -= 10000.0
    target[0] = 4600
    return logits, target, weight


def loss_kwargs(opts) -> dict:
    """The keyword arguments of torch_xent.cross_entropy that an options dict names."""
    return {k: opts[k] for k in ("ignore_index", "label_smoothing", "z_loss", "softcap", "reduction") if k in opts}


def op_options(opts, reduction="mean") -> LossOptions:
    """A LossOptions from an options dict; ``reduction`` a name or the ops' code (0 none, 1 mean, 2 sum)."""
    kw = loss_kwargs(opts)
    kw.setdefault("reduction", ("none", "mean", "sum")[reduction] if isinstance(reduction, int) else reduction)
    kw["softcap"] = kw.get("softcap") or None
    return LossOptions(**kw)


def op_args(opts):
    """(ignore_index, label_smoothing, z_loss, softcap) as the compiled ops take them (softcap 0: off)."""
    o = op_options(opts)
    return o.ignore_index, o.label_smoothing, o.z_loss, o.softcap_value


def expected_loss(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None):
    """The oracle: F.cross_entropy on the (soft-capped) logits plus z_loss * logsumexp**2 per counted row,
    reduced with F.cross_entropy's own denominator. Differentiable; any layout F.cross_entropy takes."""
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    kw = dict(weight=weight, label_smoothing=label_smoothing)
    if not target.dtype.is_floating_point:
        kw["ignore_index"] = ignore_index
    rows = F.cross_entropy(z, target, reduction="none", **kw)
    if not z_loss:
        return rows if reduction == "none" else F.cross_entropy(z, target, reduction=reduction, **kw)
    class_dim = 0 if z.dim() == 1 else 1
    lse = torch.logsumexp(z, dim=class_dim)
    valid = torch.ones_like(rows, dtype=torch.bool) if target.dtype.is_floating_point else target != ignore_index
    rows = rows + torch.where(valid, z_loss * lse * lse, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if target.dtype.is_floating_point:
        return rows.sum() / rows.numel()
    if weight is None:
        return rows.sum() / valid.sum()
    return rows.sum() / torch.where(valid, weight[torch.where(valid, target, 0)], 0).sum()


def losses_and_grads(x, target, ours, theirs=None, target_grad=False, upstream=True):
    """(loss, [grads]) of ``ours(x, target)`` and of ``theirs(x, target)`` (default: the same call),
    with the same upstream gradient (a ramp, so a per-row grad_output bug shows). Half-precision
    inputs go to ``theirs`` in float32, so the oracle does not round in half precision."""
    out = []
    for fn in (ours, theirs or ours):
        xx = x.detach().clone().requires_grad_(True)
        tt = target.detach().clone().requires_grad_(target_grad)
        if fn is theirs and xx.dtype in HALF:
            xx32 = xx.float()
            loss = fn(xx32, tt.float() if tt.is_floating_point() else tt)
        else:
            loss = fn(xx, tt)
        ramp = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
        grad_out = ramp if upstream else torch.ones_like(loss)
        inputs = [xx, tt] if target_grad else [xx]
        grads = torch.autograd.grad(loss, inputs, grad_out) if loss.numel() else [torch.zeros_like(i) for i in inputs]
        out.append((loss.detach(), [g.detach() for g in grads]))
    return out[0], out[1]


def assert_matches_reference(out, logits, target, weight, opts: LossOptions, compute_grad=True, what=""):
    """Compares an op's (loss, lse, grad) with torch_xent.reference's: dtypes, shapes and values."""
    loss, lse, grad = out
    rloss, rlse, rgrad = reference.cross_entropy_forward(logits, target, weight, opts, compute_grad)
    dtype = logits.dtype
    acc = reference.acc_dtype(dtype)
    assert loss.dtype == acc and lse.dtype == acc, what
    assert loss.shape == rloss.shape and lse.shape == rlse.shape, what
    c = logits.shape[1]
    assert_close(loss, rloss, dtype, f"loss {what}", "acc", num_classes=c)
    assert_close(lse, rlse, dtype, f"lse {what}", "acc", num_classes=c)
    if compute_grad and grad is not None:
        assert grad.dtype == dtype and grad.shape == logits.shape and grad.is_contiguous(), what
        assert_close(grad, rgrad, dtype, f"grad {what}", "grad")
    elif grad is not None:
        assert grad.numel() == 0, what


def _tol(dtype, scale=1.0):
    rtol, atol = TOL[dtype]["matmul"]
    return dict(rtol=rtol, atol=atol * max(1.0, scale))


def _leaf(t, dtype=None):
    if not isinstance(t, torch.Tensor):
        return t
    out = t.detach().clone() if dtype is None or not t.is_floating_point() else t.detach().to(dtype)
    return out.requires_grad_(t.requires_grad)


def _compare(what, got, want, dtype):
    scale = float(want.detach().abs().nan_to_num().max()) if want.numel() else 1.0
    torch.testing.assert_close(got.detach().double(), want.detach().double(), equal_nan=True,
                               msg=lambda m: f"{what}: {m}", **_tol(dtype, scale))


def check_against_oracle(fn_ours, fn_oracle, tensors, dtype, what):
    """Calls ``fn_ours(**tensors)`` and ``fn_oracle(**tensors in float64)`` and compares the values and
    the gradients with respect to every tensor that requires grad (a ramp as upstream gradient), with
    TOL[dtype]["matmul"] scaled by the values' magnitude. Used for PyTorch's own sample inputs."""
    ours = {k: _leaf(v) for k, v in tensors.items()}
    theirs = {k: _leaf(v, torch.float64) for k, v in tensors.items()}
    lo, lt = fn_ours(**ours), fn_oracle(**theirs)
    assert lo.dtype == dtype and lo.shape == lt.shape, what
    _compare(f"{what} loss", lo, lt, dtype)
    names = [k for k, v in ours.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    if not names:
        return
    ramp = torch.linspace(0.5, 1.5, lt.numel(), dtype=torch.float64).reshape(lt.shape)
    go = torch.autograd.grad(lo, [ours[k] for k in names], ramp.to(lo.dtype), allow_unused=True)
    gt = torch.autograd.grad(lt, [theirs[k] for k in names], ramp, allow_unused=True)
    for name, a, b in zip(names, go, gt):
        if b is None:
            assert a is None or not a.any(), f"{what}: grad {name}"
            continue
        assert a is not None and a.dtype == ours[name].dtype and a.shape == b.shape, f"{what}: grad {name}"
        _compare(f"{what} grad {name}", a, b, dtype)


def worked_example() -> dict:
    """The worked example of docs/gradient.md as the package ships it (x, W, target, published figures)."""
    return json.loads(importlib.resources.files("torch_xent").joinpath("data", "worked_example.json").read_text())


def free_port() -> int:
    """A TCP port on the loopback interface that is free now (for torch.distributed and servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
