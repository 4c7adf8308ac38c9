"""linear_cross_entropy against the unfused layer F.cross_entropy(F.linear(x, W, b)): values and the
gradients of input, weight and bias for every option, chunk size and dtype; gradcheck and gradgradcheck."""

import pytest
import torch
import torch.nn.functional as F

import torch_xent
from helpers import TOL, expected_loss
from torch_xent import LinearCrossEntropyLoss, linear_cross_entropy
from torch_xent.linear import CHUNK_BYTES, MIN_CHUNK_ROWS, default_chunk_rows

IMPLS = ["aten", "reference"] + (["native"] if torch_xent.native_available("cpu") else [])
N, D, V = 37, 16, 50

CASES = {
    "mean": dict(reduction="mean"),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "mean-nobias": dict(reduction="mean", bias=False),
    "none-nobias": dict(reduction="none", bias=False),
    "weights": dict(reduction="mean", weights=True),
    "weights-sum": dict(reduction="sum", weights=True),
    "ignore": dict(reduction="mean", ignore=True),
    "ignore-255-none": dict(reduction="none", ignore=True, ignore_index=255),
    "smoothing": dict(reduction="mean", label_smoothing=0.2),
    "smoothing-weights-ignore": dict(reduction="mean", label_smoothing=0.15, weights=True, ignore=True),
    "zloss": dict(reduction="mean", z_loss=1e-2, ignore=True),
    "zloss-none": dict(reduction="none", z_loss=1e-2),
    "softcap": dict(reduction="sum", softcap=3.0),
    "everything": dict(reduction="mean", weights=True, ignore=True, label_smoothing=0.1, z_loss=1e-3, softcap=4.0),
    "everything-none": dict(reduction="none", weights=True, ignore=True, label_smoothing=0.1, z_loss=1e-3,
                            softcap=4.0),
    "kdim": dict(reduction="mean", out_features=(3,), ignore=True),
    "kdim-none": dict(reduction="none", out_features=(2, 3), z_loss=1e-2, softcap=4.0),
    "soft": dict(reduction="mean", soft=True, weights=True, label_smoothing=0.1),
    "soft-none": dict(reduction="none", soft=True, z_loss=1e-2),
    "soft-kdim-sum": dict(reduction="sum", soft=True, out_features=(3,)),
    "all-ignored": dict(reduction="mean", ignore="all"),
    "uint8": dict(reduction="sum", uint8=True),
}
CHUNKS = [None, 8, 7, 1000]  # 7 does not divide 37


def make(case, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = case.get("out_features", ())
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, *out, D, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    b = (torch.randn(V, *out, generator=g, dtype=torch.float64) * 0.5).to(dtype) if case.get("bias", True) else None
    ii = case.get("ignore_index", -100)
    t = torch.randint(0, V, (N, *out), generator=g)
    if case.get("soft"):
        t = torch.softmax(torch.randn(N, V, *out, generator=g, dtype=torch.float64), 1).to(dtype)
    if case.get("ignore") is True:
        t.view(-1)[::4] = ii
    elif case.get("ignore") == "all":
        t[...] = ii
    if case.get("uint8"):
        t = t.to(torch.uint8)
    cw = (torch.rand(V, generator=g, dtype=torch.float64) + 0.2).to(dtype) if case.get("weights") else None
    return x, w, b, t, cw


def unfused(x, w, b, t, cw, case):
    """The unfused layer: the oracle (F.cross_entropy with z-loss and softcap in closed form) on F.linear."""
    out = w.shape[1:-1]
    z = F.linear(x, w.reshape(-1, w.shape[-1]), None if b is None else b.reshape(-1)).reshape(x.shape[0], V, *out)
    return expected_loss(z, t if t.is_floating_point() else t.long(), cw, ignore_index=case.get("ignore_index", -100),
                         reduction=case["reduction"], label_smoothing=case.get("label_smoothing", 0.0),
                         z_loss=case.get("z_loss", 0.0), softcap=case.get("softcap"))


def fused(x, w, b, t, cw, case, impl, chunk):
    return linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, reduction=case["reduction"],
                                ignore_index=None if case.get("soft") else case.get("ignore_index", -100),
                                label_smoothing=case.get("label_smoothing", 0.0), z_loss=case.get("z_loss", 0.0),
                                softcap=case.get("softcap"), chunk_size=chunk, impl=impl)


def grads_of(loss, inputs, grad_out):
    return torch.autograd.grad((loss.to(torch.float64) * grad_out).sum(), inputs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_unfused_layer(name, dtype, impl):
    case = CASES[name]
    x, w, b, t, cw = make(case, dtype)
    soft = case.get("soft", False)
    leaves = [x, w, b] + ([t] if soft else [])  # a probability target is differentiated too
    ref_leaves = [None if p is None else p.detach().to(torch.float64).requires_grad_() for p in leaves]
    rt = ref_leaves[3] if soft else t
    want = unfused(*ref_leaves[:3], rt, None if cw is None else cw.to(torch.float64), case)
    leaves = [p for p in leaves if p is not None]
    ref_leaves = [p for p in ref_leaves if p is not None]
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(want.shape, generator=g, dtype=torch.float64) if want.dim() else torch.tensor(1.3,
                                                                                                          dtype=torch.float64)
    want_grads = grads_of(want, ref_leaves, grad_out) if name != "all-ignored" else \
        [torch.zeros_like(p) for p in ref_leaves]  # F.cross_entropy gives 0/0 = NaN there; we give 0
    rtol, atol = TOL[dtype]["matmul"]
    chunks = CHUNKS if dtype == torch.float64 else [None, 7]
    for chunk in chunks:
        params = [p.detach().clone().requires_grad_() for p in leaves]
        pb = params[2] if b is not None else None
        got = fused(params[0], params[1], pb, params[-1] if soft else t, cw, case, impl, chunk)
        assert got.dtype == dtype and got.shape == want.shape
        scale = max(1.0, float(want.detach().abs().nan_to_num().max()))
        torch.testing.assert_close(got.detach().to(torch.float64), want.detach(), atol=atol * scale, rtol=rtol,
                                   equal_nan=True, msg=lambda m: f"loss, chunk {chunk}: {m}")
        got_grads = grads_of(got, params, grad_out)
        labels = ("input", "weight") + (("bias",) if b is not None else ()) + (("target",) if soft else ())
        for label, gg, wg in zip(labels, got_grads, want_grads):
            assert gg.dtype == dtype and gg.shape == wg.shape
            gscale = max(1e-3, float(wg.abs().max()))
            torch.testing.assert_close(gg.to(torch.float64), wg, atol=atol * gscale, rtol=rtol,
                                       msg=lambda m, label=label: f"grad {label}, chunk {chunk}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["mean", "none", "everything", "everything-none", "weights-sum", "kdim", "soft",
                                  "soft-none"])
def test_gradcheck_and_gradgradcheck(name, impl):
    case = dict(CASES[name])
    g = torch.Generator().manual_seed(3)
    out = (2,) if case.get("out_features") else ()
    v, d, n = 6, 4, 7
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, *out, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, *out, generator=g, dtype=torch.float64, requires_grad=True)
    if case.get("soft"):
        t = torch.softmax(torch.randn(n, v, *out, generator=g, dtype=torch.float64), 1).requires_grad_()
    else:
        t = torch.randint(0, v, (n, *out), generator=g)
        if case.get("ignore"):
            t.view(-1)[::3] = -100
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.2 if case.get("weights") else None

    def f(x, w, b, *soft):
        return linear_cross_entropy(x, w, soft[0] if soft else t, linear_bias=b, weight=cw,
                                    reduction=case["reduction"], label_smoothing=case.get("label_smoothing", 0.0),
                                    z_loss=case.get("z_loss", 0.0), softcap=case.get("softcap"), chunk_size=2,
                                    impl=impl)

    inputs = (x, w, b) + ((t,) if case.get("soft") else ())
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("impl", IMPLS)
def test_second_backward_and_grad_output(impl):
    case = CASES["everything"]
    x, w, b, t, cw = make(case, torch.float64)
    params = [p.requires_grad_() for p in (x, w, b)]
    loss = fused(*params, t, cw, case, impl, 7)
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params, torch.tensor(2.0, dtype=torch.float64))
    for a, c in zip(first, second):
        torch.testing.assert_close(2 * a, c, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_and_no_grad(impl):
    case = CASES["ignore"]
    x, w, b, t, cw = make(case, torch.float32)
    x.requires_grad_()
    loss = fused(x, w, b, t, cw, case, impl, 8)
    (gx,) = torch.autograd.grad(loss, x)
    xr = x.detach().double().requires_grad_()
    (wx,) = torch.autograd.grad(unfused(xr, w.double(), b.double(), t, None, case), xr)
    torch.testing.assert_close(gx.double(), wx, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, w, b, t, cw, case, impl, None).double(),
                                   unfused(x.double(), w.double(), b.double(), t, None, case), atol=1e-5, rtol=1e-5)


def test_module_and_options():
    """The module holds the classifier (PyTorch's constructor) and torch_xent's extra options."""
    x, w, b, t, cw = make(CASES["weights"], torch.float64)
    loss_fn = LinearCrossEntropyLoss(D, V, bias=True, weight=cw, label_smoothing=0.1, reduction="sum", chunk_size=5,
                                     dtype=torch.float64)
    assert "chunk_size=5" in repr(loss_fn) and "in_features=16" in repr(loss_fn)
    with torch.no_grad():
        loss_fn.linear.weight.copy_(w)
        loss_fn.linear.bias.copy_(b)
    got = loss_fn(x, t)
    want = F.cross_entropy(F.linear(x, w, b), t, weight=cw, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(got, want)
    assert [name for name, _ in loss_fn.named_parameters()] == ["linear.weight", "linear.bias"]


def test_options_are_honoured():
    """torch.nn.LinearCrossEntropyOptions: chunk rows, half accumulation dtype, the retain-graph switch."""
    from torch_xent.linear import chunk_rows_for, half_accumulates_in_float32

    opts = torch.nn.LinearCrossEntropyOptions
    assert chunk_rows_for(opts(batch_chunk_size=3), None, 37, D, V, torch.float32) == 3
    assert chunk_rows_for(opts(batch_chunk_size=3), 5, 37, D, V, torch.float32) == 5  # chunk_size wins
    # aspect_ratio: the (chunk, V) block as large as the (N, D) input, rounded up to a power of two.
    assert chunk_rows_for(opts(chunking_method="aspect_ratio"), None, 4096, 1024, 32000, torch.float32) == 128
    assert chunk_rows_for(opts(chunking_method="aspect_ratio:4"), None, 4096, 1024, 32000, torch.float32) == 32
    assert chunk_rows_for(None, None, 37, D, V, torch.float32) == default_chunk_rows(37, V, torch.float32)
    assert half_accumulates_in_float32(None, torch.bfloat16)
    assert not half_accumulates_in_float32(opts(acc_dtype=torch.bfloat16), torch.bfloat16)
    x, w, b, t, cw = make(CASES["mean"], torch.float32)
    w.requires_grad_()
    for allow in (False, True):
        loss = linear_cross_entropy(x, w, t, options=opts(allow_retain_graph=allow, batch_chunk_size=8))
        first = torch.autograd.grad(loss, w, retain_graph=True)[0]
        if allow:
            torch.testing.assert_close(torch.autograd.grad(loss, w)[0], first, rtol=0, atol=0)
        else:
            with pytest.raises(RuntimeError, match="allow_retain_graph=True"):
                torch.autograd.grad(loss, w)
    # acc_dtype = bfloat16: the weight gradient accumulates in bfloat16 and is still close.
    xb, wb = x.bfloat16(), w.detach().bfloat16().requires_grad_()
    for acc in (None, torch.bfloat16):
        loss = linear_cross_entropy(xb, wb, t, options=opts(acc_dtype=acc, batch_chunk_size=8))
        (g,) = torch.autograd.grad(loss, wb)
        want = torch.autograd.grad(F.cross_entropy(F.linear(x, w), t), w)[0]
        torch.testing.assert_close(g.float(), want, rtol=5e-2, atol=5e-3)


def test_default_chunk_size():
    rows = default_chunk_rows(4096, 32000, torch.float32)
    assert 1 <= rows <= 4096 and (rows * 32000 * 4 <= CHUNK_BYTES or rows <= MIN_CHUNK_ROWS)
    assert default_chunk_rows(10, 32000, torch.float32) == 10
    assert default_chunk_rows(10**6, 10**9, torch.float32) >= 1


def test_bad_arguments():
    x, w, b, t, cw = make(CASES["mean"], torch.float32)
    with pytest.raises(IndexError, match="Target 50 is out of bounds"):
        linear_cross_entropy(x, w, torch.full_like(t, 50))
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        linear_cross_entropy(x, w, t, reduction="avg")
    with pytest.raises(RuntimeError, match="in_features"):
        linear_cross_entropy(x, w[:, :3], t)
    with pytest.raises(RuntimeError, match="dimensionality 1 or 2"):
        linear_cross_entropy(x.reshape(1, *x.shape), w, t.reshape(1, -1))
    with pytest.raises(RuntimeError, match="dtype"):
        linear_cross_entropy(x, w.double(), t)
    with pytest.raises(ValueError, match="Expected input batch_size"):
        linear_cross_entropy(x, w, t[:3])
    with pytest.raises(RuntimeError, match="Long or Byte"):
        linear_cross_entropy(x, w, t.int())
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(x, w, t, chunk_size=0)
