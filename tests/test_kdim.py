"""K-dimensional input, (N, C, d1, ..., dK), in its own layout.

The CPU kernel takes such logits as an (N, C, S) tensor (S = d1 * ... * dK, positions contiguous)
without moving the classes last; channels-last memory viewed as (N, C, d1, ..., dK) is (M, C) rows
already. Both are checked here against torch.nn.functional and the reference, op by op and through
torch_xent.cross_entropy: values, gradients (gradcheck and gradgradcheck in float64), the gradient's
layout (no copy), every option and dtype, thread-count determinism, in place, torch.compile and bad
input. Other layouts fall back to a copy, which is checked too.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import torch_xent
from helpers import DTYPES, assert_close, expected_loss, losses_and_grads, make_problem, op_args, op_options
from torch_xent import reference

ops = torch.ops.torch_xent

NATIVE_CPU = torch_xent.native_available("cpu")
needs_native = pytest.mark.skipif(not NATIVE_CPU, reason="the CPU kernel is not built")
IMPLS = ["reference", "aten"] + (["native"] if NATIVE_CPU else [])

OPTIONS = {
    "plain": {},
    "weight+ignore": {"weight": True, "ignore_index": 1},
    "smooth+ignore255": {"label_smoothing": 0.1, "ignore_index": 255},
    "weight+smooth": {"weight": True, "label_smoothing": 0.2},
    "z_loss+softcap": {"z_loss": 1e-2, "softcap": 2.5},
    "everything": {"weight": True, "label_smoothing": 0.2, "ignore_index": 2, "z_loss": 1e-2, "softcap": 2.5},
    "soft": {"soft": True},
    "soft+everything": {"soft": True, "weight": True, "label_smoothing": 0.15, "z_loss": 1e-2, "softcap": 2.0},
}


def as_rows(logits, target):
    """The (M, C) problem the row kernel and the reference take: classes last, copied."""
    c = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, c)
    tgt = target.movedim(1, -1).reshape(-1, c) if target.dtype.is_floating_point else target.reshape(-1)
    return rows, tgt


# ---------------------------------------------------------------------------------------------
# The op on (N, C, S) logits against the reference on the same problem as rows.

OP_SHAPES = [(2, 3, 1), (1, 5, 7), (3, 19, 64), (2, 7, 67), (2, 37, 130), (1, 150, 200), (0, 4, 9), (2, 4, 0)]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_op_matches_reference(dtype, shape, option):
    opts = OPTIONS[option]
    n, c, s = shape
    logits, target, weight = make_problem(shape, dtype, opts=opts)
    rows, tgt = as_rows(logits, target)
    for reduction in (0, 1, 2):
        rloss, rlse, rgrad = reference.cross_entropy_forward(rows, tgt, weight, op_options(opts, reduction), True)
        loss, lse, grad = ops.cross_entropy_forward(logits, target, weight, reduction, *op_args(opts), True)
        what = f"{option} {shape} {dtype} reduction={reduction}"
        assert loss.dtype == rloss.dtype and lse.shape == (n, s), what
        assert grad.shape == logits.shape and grad.is_contiguous() and grad.dtype == dtype, what
        assert_close(loss, rloss.reshape(n, s) if reduction == 0 else rloss, dtype, what, "acc", c)
        assert_close(lse, rlse.reshape(n, s), dtype, what, "acc", c)
        assert_close(grad, rgrad.reshape(n, s, c).movedim(-1, 1), dtype, what, "grad")
        # Without the gradient, and in place: the same loss; in place, the same gradient in the logits.
        nograd = ops.cross_entropy_forward(logits, target, weight, reduction, *op_args(opts), False)
        assert nograd[2].numel() == 0
        torch.testing.assert_close(nograd[0], loss, equal_nan=True, rtol=0, atol=0)
        buf = logits.clone()
        ip_loss, _ = ops.cross_entropy_forward_inplace(buf, target, weight, reduction, *op_args(opts))
        torch.testing.assert_close(ip_loss, loss, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(buf, grad, equal_nan=True, rtol=0, atol=0)


def _forward_of(impl):
    """The op on (N, C, S) logits: the compiled kernel's, or the pure-PyTorch path's (torch_xent.aten)."""
    if impl == "native":
        return ops.cross_entropy_forward
    from torch_xent import aten

    def forward(logits, target, weight, reduction, ignore_index, eps, z_loss, softcap, compute_grad):
        o = torch_xent.LossOptions(("none", "mean", "sum")[reduction], ignore_index, eps, z_loss, softcap or None)
        return aten.cross_entropy_forward(logits, target, weight, o, compute_grad)
    return forward


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_edge_values(dtype, impl):
    """NaN and +-inf logits, an all -inf position, ignored positions holding NaN: as the reference."""
    logits, target, _ = make_problem((2, 6, 70), dtype, opts={"ignore_index": 255})
    logits[0, 2, 3] = float("nan")
    logits[0, :, 5] = float("-inf")
    logits[1, 4, 9] = float("inf")
    logits[1, 1, 11] = float("-inf")  # one class ruled out ...
    target[1, 11] = 1                 # ... and it is the target: loss +inf
    target[0, 3] = target[0, 5] = target[1, 9] = 0  # these count
    logits[1, :, 20] = float("nan")
    target[1, 20] = 255               # ignored: counts for nothing, whatever it holds
    rows, tgt = as_rows(logits, target)
    for reduction in (0, 1):
        rloss, _, rgrad = reference.cross_entropy_forward(rows, tgt, None, op_options({"ignore_index": 255},
                                                                                      reduction))
        loss, lse, grad = _forward_of(impl)(logits, target, None, reduction, 255, 0.0, 0.0, 0.0, True)
        assert_close(loss, rloss.reshape(2, 70) if reduction == 0 else rloss, dtype, "loss", "acc", 6)
        assert_close(grad, rgrad.reshape(2, 70, 6).movedim(-1, 1), dtype, "grad", "grad")
        if reduction == 0:
            assert torch.isnan(loss[0, [3, 5]]).all() and torch.isnan(loss[1, 9]) and loss[1, 11] == float("inf")
    assert torch.equal(grad[1, :, 20], torch.zeros(6, dtype=dtype))


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
def test_op_everything_ignored(impl):
    logits, target, _ = make_problem((2, 5, 33), torch.float32)
    target.fill_(255)
    logits[0, 0, 0] = float("nan")
    for reduction, expect in ((0, torch.zeros(2, 33)), (1, torch.tensor(float("nan"))), (2, torch.tensor(0.0))):
        loss, lse, grad = _forward_of(impl)(logits, target, None, reduction, 255, 0.1, 0.0, 0.0, True)
        torch.testing.assert_close(loss, expect, equal_nan=True)
        assert torch.equal(grad, torch.zeros_like(logits)) and torch.equal(lse, torch.zeros(2, 33))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("option", ["weight+ignore", "smooth+ignore255", "z_loss+softcap", "soft"])
def test_op_deterministic_across_threads(dtype, option):
    """Bit-identical results for 1 and 2 threads (positions are split over the threads by tiles; a
    reduced loss is summed per tile, then over the tiles in order), for every reduction."""
    opts = OPTIONS[option]
    logits, target, weight = make_problem((3, 19, 1000), dtype, opts=opts)
    threads = torch.get_num_threads()
    try:
        for reduction in (0, 1, 2):
            outs = []
            for n in (1, 2, 1):
                torch.set_num_threads(n)
                outs.append(ops.cross_entropy_forward(logits, target, weight, reduction, *op_args(opts), True))
            for out in outs[1:]:
                for a, b in zip(out, outs[0]):
                    assert torch.equal(a, b), (option, dtype, reduction)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_op_argument_errors():
    z = torch.randn(2, 5, 6)
    y = torch.randint(0, 5, (2, 6))
    f = ops.cross_entropy_forward
    cases = [
        (lambda: f(z, y[:, :5], None, 1, -100, 0.0, 0.0, 0.0, True), r"shape \(2, 6\)"),
        (lambda: f(z, y.reshape(-1), None, 1, -100, 0.0, 0.0, 0.0, True), r"shape \(2, 6\)"),
        (lambda: f(z, z[:, :, :5].contiguous(), None, 1, -100, 0.0, 0.0, 0.0, True), "logits' shape"),
        (lambda: f(z.unsqueeze(-1), y, None, 1, -100, 0.0, 0.0, 0.0, True), "3-D"),
        (lambda: ops.cross_entropy_forward_inplace(z.transpose(0, 2), y.t(), None, 1, -100, 0.0, 0.0, 0.0),
         "contiguous"),
    ]
    for call, words in cases:
        with pytest.raises(RuntimeError, match=words):
            call()
    y[1, 3] = 5
    with pytest.raises(IndexError, match="Target 5 is out of bounds."):
        f(z, y, None, 1, -100, 0.0, 0.0, 0.0, True)


@needs_native
def test_opcheck_3d():
    for dtype in (torch.float32, torch.bfloat16):
        for opts in ({}, {"weight": True, "label_smoothing": 0.1, "ignore_index": 1}, {"soft": True}):
            logits, target, weight = make_problem((2, 5, 9), dtype, opts=opts)
            for reduction in (0, 1):
                torch.library.opcheck(ops.cross_entropy_forward.default,
                                      (logits.clone().requires_grad_(), target, weight, reduction, *op_args(opts),
                                       True))
                torch.library.opcheck(ops.cross_entropy_forward_inplace.default,
                                      (logits.clone(), target, weight, reduction, *op_args(opts)))
                # need_lse=False: the same loss and gradient, and no lse materialised
                torch.library.opcheck(ops.cross_entropy_forward_inplace.default,
                                      (logits.clone(), target, weight, reduction, *op_args(opts), False))
                full = ops.cross_entropy_forward(logits, target, weight, reduction, *op_args(opts), True)
                lean = ops.cross_entropy_forward(logits, target, weight, reduction, *op_args(opts), True, False)
                assert lean[1].numel() == 0 and full[1].shape == (2, 9)
                assert torch.equal(lean[0], full[0]) and torch.equal(lean[2], full[2])
    torch.library.opcheck(ops.cross_entropy_backward.default, (torch.randn(2, 5, 9), torch.rand(2, 9)))


# ---------------------------------------------------------------------------------------------
# Through torch_xent.cross_entropy: every impl against the F.cross_entropy oracle, in three layouts.

def laid_out(x, layout):
    """x (N, C, d1, ..., dK) with the same values in another memory layout (a differentiable copy):
    contiguous, channels-last (classes last in memory, viewed as (N, C, ...)), or strided (every other
    element of a larger tensor along the last dimension: a layout that is copied before the kernel)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    big = torch.cat([x.unsqueeze(-1), torch.zeros_like(x).unsqueeze(-1)], dim=-1).flatten(-2)
    return big[..., ::2]


API_SHAPES = [(2, 3, 5), (3, 4, 7, 9), (2, 5, 3, 4, 5), (1, 19, 1, 1), (2, 37, 3, 23), (1, 6, 65)]
API_OPTIONS = ["plain", "weight+ignore", "smooth+ignore255", "everything", "soft+everything"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", API_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("option", API_OPTIONS)
def test_matches_functional(impl, dtype, shape, layout, option):
    opts = OPTIONS[option]
    soft = bool(opts.get("soft"))
    x, target, weight = make_problem(shape, dtype, opts=opts, seed=1)
    for reduction in ("none", "mean"):
        kw = dict(reduction=reduction, ignore_index=opts.get("ignore_index", -100),
                  label_smoothing=opts.get("label_smoothing", 0.0), z_loss=opts.get("z_loss", 0.0),
                  softcap=opts.get("softcap"))

        def ours(xx, tt):
            return torch_xent.cross_entropy(laid_out(xx, layout), tt, weight, impl=impl, **kw)

        def theirs(xx, tt):
            return expected_loss(xx, tt, None if weight is None else weight.to(xx.dtype), **kw)

        (loss, grads), (eloss, egrads) = losses_and_grads(x, target, ours, theirs, target_grad=soft)
        what = f"{impl} {option} {shape} {layout} {dtype} {reduction}"
        assert loss.shape == eloss.shape and loss.dtype == dtype, what
        assert_close(loss, eloss, dtype, what)
        for g, e in zip(grads, egrads):
            assert_close(g, e, dtype, what)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradient_in_the_input_layout(layout, impl, monkeypatch):
    """The gradient comes back in the input's own layout; with inplace_backward it is the input's storage.
    (The pure-PyTorch path in chunks of 10 positions: several a batch item, the last one partial.)"""
    monkeypatch.setattr(torch_xent.aten, "CPU_CHUNK_BYTES", 10 * 19 * 4)
    x, target, weight = make_problem((2, 19, 9, 13), torch.float32, opts={"weight": True, "ignore_index": 255})
    kw = dict(ignore_index=255, label_smoothing=0.1)
    leaf = laid_out(x, layout).detach().requires_grad_()
    (grad,) = torch.autograd.grad(torch_xent.cross_entropy(leaf, target, weight, impl=impl, **kw), leaf)
    assert grad.stride() == leaf.stride()
    expect = torch.autograd.grad(expected_loss(leaf, target, weight, **kw), leaf)[0]
    assert_close(grad, expect, torch.float32)

    base = x.detach().clone().requires_grad_()
    logits = laid_out(base * 1.0, layout)  # a non-leaf, as a model's output
    strides = logits.stride()
    loss = torch_xent.cross_entropy(logits, target, weight, impl=impl, inplace_backward=True, **kw)
    loss.backward()
    # The logits' own storage now holds the gradient, in their layout; autograd handed it on.
    assert logits.stride() == strides
    assert_close(logits.detach(), expect, torch.float32)
    assert_close(base.grad, expect, torch.float32)


GRADCHECK_SHAPES = [(2, 3, 4), (2, 3, 2, 3), (1, 3, 2, 2, 3), (1, 4, 1, 1)]
GRADCHECK_OPTIONS = ["plain", "weight+ignore", "everything", "soft+everything"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("option", GRADCHECK_OPTIONS)
def test_gradcheck(impl, shape, option):
    opts = OPTIONS[option]
    x, target, weight = make_problem(shape, torch.float64, opts=dict(opts, scale=1.0), seed=2)
    if "ignore_index" in opts and not opts.get("soft"):  # one position ignored, the last one counted
        target.view(-1)[0] = opts["ignore_index"]
        target.view(-1)[-1] = 0
    layout = "channels_last" if len(shape) >= 4 and option != "plain" else "contiguous"
    kw = dict(ignore_index=opts.get("ignore_index", -100), label_smoothing=opts.get("label_smoothing", 0.0),
              z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"))
    inputs = [x.requires_grad_()] + ([target.requires_grad_()] if opts.get("soft") else [])
    for reduction in ("none", "mean"):
        def fn(*args):
            tgt = args[1] if len(args) > 1 else target
            return torch_xent.cross_entropy(laid_out(args[0], layout), tgt, weight, reduction=reduction, impl=impl,
                                            **kw)

        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("impl", IMPLS)
def test_everything_ignored(impl):
    x, target, _ = make_problem((2, 5, 3, 7), torch.float32)
    target.fill_(255)
    x = x.requires_grad_()
    for reduction in ("mean", "sum", "none"):
        loss = torch_xent.cross_entropy(x, target, ignore_index=255, reduction=reduction, impl=impl)
        expect = F.cross_entropy(x, target, ignore_index=255, reduction=reduction)
        torch.testing.assert_close(loss, expect, equal_nan=True)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_raises_as_functional(impl):
    x = torch.randn(2, 5, 3, 4)
    y = torch.randint(0, 5, (2, 3, 4))
    bad_high = y.clone()
    bad_high[1, 2, 3] = 5
    cases = [(x, y[:, :2]), (x, y.reshape(2, 12)), (x, bad_high), (x, torch.rand(2, 5, 3, 3))]
    for logits, target in cases:
        with pytest.raises(Exception) as theirs:
            F.cross_entropy(logits, target)
        with pytest.raises(type(theirs.value)):
            torch_xent.cross_entropy(logits, target, impl=impl)


_COMPILE_SCRIPT = textwrap.dedent("""
    import torch, torch_xent
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 7, 3, padding=1)
    x = torch.randn(2, 3, 9, 11)
    y = torch.randint(0, 7, (2, 9, 11))
    y[0, :4] = 255
    w = torch.rand(7) + 0.5

    def step(x, y):
        logits = conv(x)  # contiguous (N, C, H, W): the kernel reads it in place
        return torch_xent.cross_entropy(logits, y, w, ignore_index=255, label_smoothing=0.1, impl="native")

    eager = step(x, y)
    eager_grads = torch.autograd.grad(eager, list(conv.parameters()))
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    loss = compiled(x, y)
    grads = torch.autograd.grad(loss, list(conv.parameters()))
    ref = torch.nn.functional.cross_entropy(conv(x), y, w, ignore_index=255, label_smoothing=0.1)
    torch.testing.assert_close(eager, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    print("ok")
""")


@needs_native
def test_torch_compile_fullgraph_fresh_process():
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("ok"), proc.stdout + proc.stderr


@needs_native
def test_op_zero_coefficient_with_a_target_share():
    """A position whose softmax coefficient sum_q + 2 z_loss lse is exactly 0 while its target's share
    is not (C = 1, every logit -1, z_loss 0.5: lse = -1): the kernel's fast gradient loop, which divides
    by that factor, must not run there. The gradient is lse * p + p - 1 = -1."""
    logits = torch.full((1, 1, 70), -1.0)
    logits[0, 0, 64:] = -2.0  # the second tile: an ordinary factor (lse = -2)
    target = torch.zeros(1, 70, dtype=torch.long)
    loss, lse, grad = ops.cross_entropy_forward(logits, target, None, 2, -100, 0.0, 0.5, 0.0, True)
    rows, tgt = as_rows(logits, target)
    rloss, _, rgrad = reference.cross_entropy_forward(rows, tgt, None, op_options({"z_loss": 0.5}, 2), True)
    assert torch.equal(grad[0, 0, :64], torch.full((64,), -1.0))
    torch.testing.assert_close(grad, rgrad.reshape(1, 70, 1).movedim(-1, 1))
    torch.testing.assert_close(loss, rloss)
