"""linear_cross_entropy against the unfused layer F.cross_entropy(F.linear(x, W, b)): values and the
gradients of input, weight and bias for every option, chunk size and dtype; gradcheck and gradgradcheck."""

import pytest
import torch
import torch.nn.functional as F

import torch_xent
from helpers import TOL, expected_loss
from torch_xent import LinearCrossEntropyLoss, linear_cross_entropy
from torch_xent.linear import CHUNK_BYTES, MIN_CHUNK_ROWS, default_chunk_rows

IMPLS = ["reference"] + (["native"] if torch_xent.native_available("cpu") else [])
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
    "3d": dict(reduction="mean", shape=(4, 9), ignore=True),
    "3d-none": dict(reduction="none", shape=(4, 9)),
    "all-ignored": dict(reduction="mean", ignore="all"),
    "uint8": dict(reduction="sum", uint8=True),
}
CHUNKS = [None, 8, 7, 1000]  # 7 does not divide 37


def make(case, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = case.get("shape", (N,))
    x = torch.randn(*shape, D, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if case.get("bias", True) else None
    ii = case.get("ignore_index", -100)
    t = torch.randint(0, V, shape, generator=g)
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
    z = F.linear(x, w, b).reshape(-1, V)
    loss = expected_loss(z, t.reshape(-1).long(), cw, ignore_index=case.get("ignore_index", -100),
                         reduction=case["reduction"], label_smoothing=case.get("label_smoothing", 0.0),
                         z_loss=case.get("z_loss", 0.0), softcap=case.get("softcap"))
    return loss.reshape(t.shape) if case["reduction"] == "none" else loss


def fused(x, w, b, t, cw, case, impl, chunk):
    return linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, reduction=case["reduction"],
                                ignore_index=case.get("ignore_index", -100),
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
    leaves = [x, w] + ([b] if b is not None else [])
    ref_leaves = [p.detach().to(torch.float64).requires_grad_() for p in leaves]
    rb = ref_leaves[2] if b is not None else None
    want = unfused(ref_leaves[0], ref_leaves[1], rb, t, None if cw is None else cw.to(torch.float64), case)
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
        got = fused(params[0], params[1], pb, t, cw, case, impl, chunk)
        assert got.dtype == dtype and got.shape == want.shape
        scale = max(1.0, float(want.detach().abs().nan_to_num().max()))
        torch.testing.assert_close(got.detach().to(torch.float64), want.detach(), atol=atol * scale, rtol=rtol,
                                   equal_nan=True, msg=lambda m: f"loss, chunk {chunk}: {m}")
        got_grads = grads_of(got, params, grad_out)
        for label, gg, wg in zip(("input", "weight", "bias"), got_grads, want_grads):
            assert gg.dtype == dtype and gg.shape == wg.shape
            gscale = max(1e-3, float(wg.abs().max()))
            torch.testing.assert_close(gg.to(torch.float64), wg, atol=atol * gscale, rtol=rtol,
                                       msg=lambda m, label=label: f"grad {label}, chunk {chunk}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["mean", "none", "everything", "everything-none", "weights-sum", "3d"])
def test_gradcheck_and_gradgradcheck(name, impl):
    case = dict(CASES[name])
    g = torch.Generator().manual_seed(3)
    shape = (3, 3) if case.get("shape") else (7,)
    case["shape"] = shape
    v, d = 6, 4
    x = torch.randn(*shape, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, v, shape, generator=g)
    if case.get("ignore"):
        t.view(-1)[::3] = -100
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.2 if case.get("weights") else None

    def f(x, w, b):
        return linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, reduction=case["reduction"],
                                    label_smoothing=case.get("label_smoothing", 0.0), z_loss=case.get("z_loss", 0.0),
                                    softcap=case.get("softcap"), chunk_size=2, impl=impl)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


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
    x, w, b, t, cw = make(CASES["weights"], torch.float64)
    loss_fn = LinearCrossEntropyLoss(weight=cw, label_smoothing=0.1, reduction="sum", chunk_size=5)
    assert "chunk_size=5" in repr(loss_fn)
    got = loss_fn(x, w, t, b)
    want = F.cross_entropy(F.linear(x, w, b), t, weight=cw, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(got, want)
    assert len(list(loss_fn.parameters())) == 0  # the classifier belongs to the model


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
    with pytest.raises(ValueError, match="features"):
        linear_cross_entropy(x, w[:, :3], t)
    with pytest.raises(RuntimeError, match="dtype"):
        linear_cross_entropy(x, w.double(), t)
    with pytest.raises(ValueError, match="target shape"):
        linear_cross_entropy(x, w, t[:3])
    with pytest.raises(RuntimeError, match="Long or Byte"):
        linear_cross_entropy(x, w, t.int())
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(x, w, t, chunk_size=0)
