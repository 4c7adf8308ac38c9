"""torch_xent.cross_entropy against torch.nn.functional.cross_entropy: values, gradients, errors.

Every test runs over each (device, implementation) pair in conftest.DEVICE_IMPLS, so the same table
validates the reference, the C++ kernel and (on a GPU machine) the CUDA kernel.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_xent
from helpers import assert_close, expected_loss, losses_and_grads, make_problem, make_targets
from torch_xent import LossOptions, reference

def both(x, target, impl, loss_kw=None, torch_loss=None, target_grad=False):
    """Loss and gradients from torch_xent and from the oracle (default: helpers.expected_loss, i.e.
    F.cross_entropy and the closed forms), with the same upstream gradient."""
    loss_kw = loss_kw or {}

    def ours(xx, tt):
        return torch_xent.cross_entropy(xx, tt, impl=impl, **loss_kw)

    def oracle(xx, tt):
        kw = dict(loss_kw)
        if kw.get("weight") is not None:
            kw["weight"] = kw["weight"].to(xx.dtype)
        return expected_loss(xx, tt, **kw)

    return losses_and_grads(x, target, ours, torch_loss or oracle, target_grad=target_grad)


# ---------------------------------------------------------------------------------------------
# Parity table: shapes x options x reductions x dtypes.

SHAPES = {
    "2d": ((9, 5), None),
    "odd": ((33, 17), None),
    "C=1": ((6, 1), None),
    "wide": ((5, 1003), None),
    "kdim": ((3, 4, 2, 5), None),
    "unbatched": ((7,), None),
    "noncontig": ((8, 6), "transpose"),
}
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": 1},
    "smooth": {"label_smoothing": 0.2},
    "weight+smooth+ignore": {"weight": True, "label_smoothing": 0.3, "ignore_index": 0},
    "ignore-outside": {"ignore_index": -100, "ignore_frac_out": True},
    "soft": {"soft": True},
    "soft+weight+smooth": {"soft": True, "weight": True, "label_smoothing": 0.15},
}


def build_case(shape_name, option, dtype, device, seed=0):
    """(logits, target, loss keyword arguments) for a row of SHAPES and of OPTIONS."""
    shape, layout = SHAPES[shape_name]
    c = shape[0 if len(shape) == 1 else 1]
    ii = option.get("ignore_index")
    opts = dict(option, layout=layout, ignore_frac=0.25)
    # An ignore_index inside [0, C) is also a class: its rows are the ignored ones. One outside the
    # range only appears in the target when the option says so.
    if ii is not None and not (ii < c or option.get("ignore_frac_out")):
        opts.pop("ignore_index")
    x, t, w = make_problem(shape, dtype, device, opts, seed)
    kw = {k: option[k] for k in ("ignore_index", "label_smoothing") if k in option}
    if w is not None:
        kw["weight"] = w
    return x, t, kw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_matches_torch_float64(device_impl, shape_name, option, reduction):
    device, impl = device_impl
    x, t, kw = build_case(shape_name, OPTIONS[option], torch.float64, device)
    kw["reduction"] = reduction
    (lo, go), (lt, gt) = both(x, t, impl, kw)
    assert lo.shape == lt.shape and lo.dtype == lt.dtype
    assert_close(lo, lt, torch.float64, f"loss {shape_name} {option} {reduction}")
    assert_close(go[0], gt[0], torch.float64, f"grad {shape_name} {option} {reduction}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("option", ["plain", "weight+smooth+ignore", "soft+weight+smooth"])
@pytest.mark.parametrize("shape_name", ["odd", "wide", "kdim"])
def test_matches_torch_lower_precision(device_impl, shape_name, option, reduction, dtype):
    device, impl = device_impl
    x, t, kw = build_case(shape_name, OPTIONS[option], dtype, device, seed=1)
    kw["reduction"] = reduction
    (lo, go), (lt, gt) = both(x, t, impl, kw)
    assert lo.dtype == dtype and go[0].dtype == dtype  # result in the input dtype
    assert_close(lo, lt, dtype)
    assert_close(go[0], gt[0], dtype)


def test_module_matches_nn_module(device_impl):
    device, impl = device_impl
    x, t, kw = build_case("odd", OPTIONS["weight+smooth+ignore"], torch.float64, device)
    ours = torch_xent.CrossEntropyLoss(impl=impl, **kw)
    theirs = torch.nn.CrossEntropyLoss(**kw)
    assert "weight" in ours.state_dict()
    assert_close(ours(x, t), theirs(x, t), torch.float64)


def test_uint8_target_equals_int64(device_impl):
    device, impl = device_impl
    x = torch.randn(10, 7, dtype=torch.float64, device=device)
    t = torch.randint(0, 7, (10,), device=device)
    a = torch_xent.cross_entropy(x, t.to(torch.uint8), impl=impl)
    b = torch_xent.cross_entropy(x, t, impl=impl)
    assert_close(a, b, torch.float64)


# ---------------------------------------------------------------------------------------------
# Extensions: z-loss and softcap, checked against expressions built from torch.nn.functional.

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_z_loss_and_softcap(device_impl, reduction, weighted):
    device, impl = device_impl
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(12, 9, generator=gen, dtype=torch.float64) * 20).to(device)
    t = make_targets((12,), 9, gen, ignore_index=-100, ignore_frac=0.25).to(device)
    w = (torch.rand(9, generator=gen, dtype=torch.float64) + 0.5).to(device) if weighted else None
    lam, cap = 1e-3, 15.0
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=lam, softcap=cap)
    (lo, go), (lt, gt) = both(x, t, impl, kw)  # the oracle writes z-loss and softcap out in closed form
    assert_close(lo, lt, torch.float64)
    assert_close(go[0], gt[0], torch.float64)


# ---------------------------------------------------------------------------------------------
# gradcheck and gradgradcheck in float64, every reduction and option, soft targets included.

GRADCHECK_OPTIONS = {
    "plain": {},
    "weight+ignore": {"weight": True, "ignore_index": 2},
    "smooth": {"label_smoothing": 0.25},
    "weight+smooth+ignore": {"weight": True, "label_smoothing": 0.1, "ignore_index": 0},
    "zloss+softcap": {"z_loss": 0.01, "softcap": 3.0, "label_smoothing": 0.05},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(GRADCHECK_OPTIONS))
def test_gradcheck_and_gradgradcheck(device_impl, option, reduction):
    device, impl = device_impl
    opt = GRADCHECK_OPTIONS[option]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    t = torch.tensor([0, 2, 3, 1, 2], device=device)
    kw = {"reduction": reduction}
    for key in ("ignore_index", "label_smoothing", "z_loss", "softcap"):
        if key in opt:
            kw[key] = opt[key]
    if opt.get("weight"):
        kw["weight"] = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).to(device)

    def f(xx):
        return torch_xent.cross_entropy(xx, t, impl=impl, **kw)

    assert torch.autograd.gradcheck(f, (x,), check_undefined_grad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x,), check_undefined_grad=True, check_batched_grad=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck_soft_targets(device_impl, reduction, weighted):
    """Differentiates with respect to the soft target too."""
    device, impl = device_impl
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    q = torch.softmax(torch.randn(4, 5, generator=gen, dtype=torch.float64), 1).to(device).requires_grad_(True)
    w = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.5).to(device) if weighted else None

    def f(xx, qq):
        return torch_xent.cross_entropy(xx, qq, weight=w, reduction=reduction, label_smoothing=0.1, impl=impl)

    assert torch.autograd.gradcheck(f, (x, q), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, q), check_batched_grad=True)
    (lo, go), (lt, gt) = both(x, q, impl, dict(weight=w, reduction=reduction, label_smoothing=0.1), target_grad=True)
    assert_close(go[1], gt[1], torch.float64, "gradient with respect to the soft target")


def test_gradcheck_fast_mode_larger(device_impl):
    device, impl = device_impl
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)  # K-dim
    t = torch.randint(0, 7, (3, 5), generator=gen).to(device)

    def f(xx):
        return torch_xent.cross_entropy(xx, t, label_smoothing=0.1, reduction="none", impl=impl)

    assert torch.autograd.gradcheck(f, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x,), fast_mode=True)


def test_backward_twice_with_retain_graph(device_impl):
    device, impl = device_impl
    x = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 0, 1], device=device)
    loss = torch_xent.cross_entropy(x, t, impl=impl)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    (loss * 2).backward()
    expected = torch.autograd.grad(F.cross_entropy(x, t), x)[0]
    assert_close(first, expected, torch.float64)
    assert_close(x.grad, 2 * expected, torch.float64)


def test_inplace_backward_gives_the_same_gradient(device_impl):
    device, impl = device_impl
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(16, 11, generator=gen).to(device)
    t = make_targets((16,), 11, gen, ignore_index=-100, ignore_frac=0.25).to(device)
    w = torch.randn(11, 11, device=device, requires_grad=True)
    expected_logits = base @ w
    expected = torch.autograd.grad(F.cross_entropy(expected_logits, t, label_smoothing=0.1), w)[0]
    logits = base @ w  # a non-leaf: its storage becomes the gradient
    loss = torch_xent.cross_entropy(logits, t, label_smoothing=0.1, inplace_backward=True, impl=impl)
    got = torch.autograd.grad(loss, w)[0]
    assert_close(got, expected, torch.float32)


def test_inplace_backward_is_caught_when_logits_were_saved(device_impl):
    """exp saves its output; overwriting it must raise autograd's error, not give a wrong gradient."""
    device, impl = device_impl
    x = torch.randn(4, 6, device=device, requires_grad=True)
    logits = x.exp()
    loss = torch_xent.cross_entropy(logits, torch.tensor([0, 1, 2, 3], device=device), inplace_backward=True,
                                    impl=impl)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_forward_matches(device_impl):
    device, impl = device_impl
    x, t, kw = build_case("odd", OPTIONS["weight+smooth+ignore"], torch.float32, device)
    with torch.no_grad():
        a = torch_xent.cross_entropy(x, t, impl=impl, **kw)
    assert_close(a, F.cross_entropy(x, t, **kw), torch.float32)
    assert not a.requires_grad


def test_cross_entropy_with_lse(device_impl):
    device, impl = device_impl
    x = torch.randn(3, 5, 4, dtype=torch.float64, device=device)
    t = torch.randint(0, 5, (3, 4), device=device)
    t[0, 0] = -100
    loss, lse = torch_xent.cross_entropy_with_lse(x, t, reduction="none", impl=impl)
    expected = torch.logsumexp(x, dim=1)
    expected[0, 0] = 0.0
    assert lse.shape == (3, 4)
    assert_close(lse, expected, torch.float64)
    assert_close(loss, F.cross_entropy(x, t, reduction="none"), torch.float64)


# ---------------------------------------------------------------------------------------------
# Edge values (docs/semantics.md, bad and edge inputs).

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(device_impl, reduction):
    device, impl = device_impl
    x = torch.randn(0, 5, device=device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=device)
    ours = torch_xent.cross_entropy(x, t, reduction=reduction, impl=impl)
    theirs = F.cross_entropy(x, t, reduction=reduction)
    assert ours.shape == theirs.shape
    assert_close(ours, theirs, torch.float32)  # none: empty, sum: 0, mean: NaN
    (g,) = torch.autograd.grad(ours.sum(), x)
    assert g.shape == (0, 5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_every_target_ignored(device_impl, reduction, smoothing):
    device, impl = device_impl
    x = torch.randn(4, 3, device=device, requires_grad=True)
    t = torch.full((4,), -100, device=device)
    loss = torch_xent.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing, impl=impl)
    assert_close(loss, F.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing), torch.float32)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(g, torch.zeros_like(g)), "all-ignored rows must give a zero gradient, never NaN"


@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), float("inf")])
def test_ignored_rows_get_zero_gradient_even_when_non_finite(device_impl, bad):
    device, impl = device_impl
    x = torch.randn(3, 4, device=device)
    x[1, 2] = bad
    x.requires_grad_(True)
    t = torch.tensor([0, -100, 3], device=device)
    loss = torch_xent.cross_entropy(x, t, label_smoothing=0.1, impl=impl)
    ref = F.cross_entropy(x, t, label_smoothing=0.1)
    assert_close(loss, ref, torch.float32)
    assert torch.isfinite(loss)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.equal(g[1], torch.zeros(4, device=device))  # PyTorch gives NaN here: we improve on it
    assert torch.isfinite(g).all()


def test_nan_propagates_where_torch_does(device_impl):
    device, impl = device_impl
    x = torch.randn(3, 4, device=device)
    x[0, 1] = float("nan")
    t = torch.tensor([0, 1, 2], device=device)
    ours = torch_xent.cross_entropy(x, t, reduction="none", impl=impl)
    theirs = F.cross_entropy(x, t, reduction="none")
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    assert torch.isnan(ours[0]) and torch.isfinite(ours[1:]).all()
    assert torch.isnan(torch_xent.cross_entropy(x, t, impl=impl))


def test_infinite_logits(device_impl):
    device, impl = device_impl
    x = torch.randn(3, 4, device=device)
    x[0, 2] = float("inf")  # -> NaN
    x[1, 3] = float("-inf")  # at a non-target class -> finite, gradient 0 there
    x[2, 1] = float("-inf")  # at the target -> inf
    x.requires_grad_(True)
    t = torch.tensor([0, 0, 1], device=device)
    ours = torch_xent.cross_entropy(x, t, reduction="none", impl=impl)
    theirs = F.cross_entropy(x, t, reduction="none")
    assert_close(ours, theirs, torch.float32)
    assert torch.isnan(ours[0]) and torch.isfinite(ours[1]) and ours[2] == float("inf")
    (g,) = torch.autograd.grad(ours[1], x)
    assert g[1, 3] == 0 and torch.isfinite(g[1]).all()


def test_large_magnitude_logits_are_exact(device_impl):
    device, impl = device_impl
    x = torch.tensor([[1e4, 0.0, -1e4], [-1e4, 1e4 - 1.0, 1e4]], dtype=torch.float32, device=device)
    t = torch.tensor([1, 1], device=device)
    ours = torch_xent.cross_entropy(x, t, reduction="none", impl=impl)
    exact = torch.tensor([1e4, 1.0 + math.log1p(math.exp(-1.0))], dtype=torch.float64)
    assert_close(ours.cpu(), exact.float(), torch.float32)


@pytest.mark.parametrize("ignore_index", [255, -1, -100, 2])
def test_ignore_index_inside_and_outside_range(device_impl, ignore_index):
    device, impl = device_impl
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    t = torch.tensor([0, 1, 2, 3, 1, 0], device=device)
    t[[1, 4]] = ignore_index
    for smoothing in (0.0, 0.3):
        ours = torch_xent.cross_entropy(x, t, ignore_index=ignore_index, label_smoothing=smoothing, impl=impl)
        theirs = F.cross_entropy(x, t, ignore_index=ignore_index, label_smoothing=smoothing)
        assert_close(ours, theirs, torch.float64)


def test_all_weights_zero(device_impl):
    device, impl = device_impl
    x = torch.randn(4, 3, device=device)
    t = torch.tensor([0, 1, 2, 0], device=device)
    w = torch.zeros(3, device=device)
    assert torch.isnan(torch_xent.cross_entropy(x, t, weight=w, impl=impl))
    assert torch_xent.cross_entropy(x, t, weight=w, reduction="sum", impl=impl) == 0


# ---------------------------------------------------------------------------------------------
# Bad input: the same exception type as PyTorch and a message naming the problem.

def _x(device):
    return torch.randn(4, 5, device=device)


BAD_INPUTS = {
    # name: (build(device) -> (input, target, kwargs), exception, message fragment, torch raises the same?)
    "target >= C": (lambda d: (_x(d), torch.tensor([0, 1, 5, 2], device=d), {}), IndexError,
                    "Target 5 is out of bounds", True),
    "negative target": (lambda d: (_x(d), torch.tensor([0, 1, -3, 2], device=d), {}), IndexError,
                        "Target -3 is out of bounds", True),
    "int32 target": (lambda d: (_x(d), torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=d), {}), RuntimeError,
                     "expected target dtype to be Long or Byte, but got Int", True),
    "float target (N,)": (lambda d: (_x(d), torch.rand(4, device=d), {}), RuntimeError,
                          "expected target dtype to be Long or Byte, but got Float", True),
    "int64 target of input shape": (lambda d: (_x(d), torch.zeros(4, 5, dtype=torch.long, device=d), {}),
                                    RuntimeError, "Expected floating point type for target with class "
                                    "probabilities, got Long", True),
    "batch sizes differ": (lambda d: (_x(d), torch.tensor([0, 1, 2], device=d), {}), ValueError,
                           "Expected input batch_size (4) to match target batch_size (3)", True),
    "2-D class target": (lambda d: (_x(d), torch.zeros(4, 2, dtype=torch.long, device=d), {}), RuntimeError,
                         "multi-target not supported", True),
    "weight length": (lambda d: (_x(d), torch.tensor([0, 1, 2, 3], device=d), {"weight": torch.ones(4, device=d)}),
                      RuntimeError, "weight tensor should be defined either for all 5 classes or no classes", True),
    "2-D weight": (lambda d: (_x(d), torch.tensor([0, 1, 2, 3], device=d), {"weight": torch.ones(5, 1, device=d)}),
                   RuntimeError, "weight tensor should be defined either for all 5 classes", True),
    "weight dtype": (lambda d: (_x(d), torch.tensor([0, 1, 2, 3], device=d),
                                {"weight": torch.ones(5, dtype=torch.float64, device=d)}), RuntimeError,
                     "expected scalar type Float but found Double", True),
    "label_smoothing > 1": (lambda d: (_x(d), torch.tensor([0, 1, 2, 3], device=d), {"label_smoothing": 1.5}),
                            RuntimeError, "label_smoothing must be between 0.0 and 1.0", True),
    "label_smoothing < 0": (lambda d: (_x(d), torch.tensor([0, 1, 2, 3], device=d), {"label_smoothing": -0.1}),
                            RuntimeError, "label_smoothing must be between 0.0 and 1.0", False),
    "reduction avg": (lambda d: (_x(d), torch.tensor([0, 1, 2, 3], device=d), {"reduction": "avg"}), ValueError,
                      "avg is not a valid value for reduction", True),
    "soft target + ignore_index": (lambda d: (_x(d), torch.rand(4, 5, device=d), {"ignore_index": 1}), RuntimeError,
                                   "ignore_index is not supported for floating point target", True),
    "integer logits": (lambda d: (torch.zeros(4, 5, dtype=torch.long, device=d), torch.tensor([0, 1, 2, 3], device=d),
                                  {}), NotImplementedError, "Long", True),
    "C = 0": (lambda d: (torch.zeros(4, 0, device=d), torch.tensor([0, 1, 2, 3], device=d), {}), IndexError,
              "0 classes", True),
    "K-dim target shape": (lambda d: (torch.randn(2, 5, 3, device=d), torch.zeros(2, 4, dtype=torch.long, device=d),
                                      {}), RuntimeError, "Expected target size [2, 3], got [2, 4]", True),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_like_torch(device_impl, case):
    device, impl = device_impl
    build, exc, fragment, torch_same = BAD_INPUTS[case]
    x, t, kw = build(device)
    if device == "cuda" and impl == "native" and exc is IndexError and "out of bounds" in fragment:
        pytest.skip("the CUDA kernel reports out-of-range targets as NaN rows (tests/test_cuda.py)")
    with pytest.raises(exc) as info:
        torch_xent.cross_entropy(x, t, impl=impl, **kw)
    assert fragment in str(info.value)
    if torch_same and device == "cpu":  # the row of docs/semantics.md really is PyTorch's behaviour
        with pytest.raises(exc):
            F.cross_entropy(x, t, **kw)


def test_out_of_range_target_with_grad_raises(device_impl):
    device, impl = device_impl
    if device == "cuda" and impl == "native":
        pytest.skip("the CUDA kernel reports out-of-range targets as NaN rows (tests/test_cuda.py)")
    x = torch.randn(3, 4, device=device, requires_grad=True)
    with pytest.raises(IndexError, match="Target 4 is out of bounds"):
        torch_xent.cross_entropy(x, torch.tensor([0, 4, 1], device=device), impl=impl)


def test_impl_argument():
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="impl must be one of"):
        torch_xent.cross_entropy(x, t, impl="fast")
    if not torch_xent.native_available("cpu"):
        with pytest.raises(RuntimeError, match="no compiled kernel"):
            torch_xent.cross_entropy(x, t, impl="native")
    else:
        torch_xent.cross_entropy(x, t, impl="native")


def test_show_config_reports_kernels():
    text = torch_xent.show_config(file=open("/dev/null", "w"))
    assert "cpu: kernel " + ("built" if torch_xent.native_available("cpu") else "not built") in text


def test_reference_oracle_agrees_with_reshaped_torch():
    """The oracle itself, on a random problem, against log_softmax written out by hand."""
    x = torch.randn(7, 6, dtype=torch.float64)
    t = torch.tensor([0, 5, 2, -100, 1, 1, 3])
    loss, lse, grad = reference.cross_entropy_forward(x, t, None, LossOptions(reduction="sum"))
    valid = t != -100
    logp = x - x.exp().sum(1, keepdim=True).log()
    assert_close(loss, -logp[valid, t[valid]].sum(), torch.float64)
    onehot = torch.zeros_like(x)
    onehot[valid, t[valid]] = 1
    assert_close(grad, (logp.exp() - onehot) * valid[:, None], torch.float64)


# ---------------------------------------------------------------------------------------------
# Property test: random shapes and options against F.cross_entropy.

@st.composite
def problems(draw):
    n = draw(st.integers(0, 9))
    c = draw(st.integers(1, 40))
    extra = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    soft = draw(st.booleans())
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    smoothing = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    weighted = draw(st.booleans())
    ignore = draw(st.sampled_from([None, -100, 0, 3]))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.1, 1.0, 30.0]))
    return n, c, extra, soft, reduction, smoothing, weighted, ignore, seed, scale


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problems())
def test_property_random_problems(device_impl, problem):
    device, impl = device_impl
    n, c, extra, soft, reduction, smoothing, weighted, ignore, seed, scale = problem
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, *extra, generator=gen, dtype=torch.float64) * scale).to(device)
    kw = {"reduction": reduction, "label_smoothing": smoothing}
    if soft:
        t = torch.softmax(torch.randn(n, c, *extra, generator=gen, dtype=torch.float64), 1).to(device)
    else:
        t = torch.randint(0, c, (n, *extra), generator=gen).to(device)
        if ignore is not None:
            kw["ignore_index"] = ignore
            t = torch.where(torch.rand(t.shape, generator=gen).to(device) < 0.3, torch.full_like(t, ignore), t)
    if weighted:
        kw["weight"] = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.1).to(device)
    (lo, go), (lt, gt) = both(x, t, impl, kw)
    assert_close(lo, lt, torch.float64)
    assert_close(go[0], gt[0], torch.float64)


def test_remembered_options_are_still_checked_each_call():
    """loss_options remembers checked plain-scalar options: invalid ones raise on every call, and a
    tensor option (which could change in place) is read afresh each time."""
    from torch_xent._options import loss_options
    for _ in range(2):
        with pytest.raises(RuntimeError, match="label_smoothing must be between"):
            loss_options("mean", -100, 1.5)
        with pytest.raises(ValueError, match="is not a valid value for reduction"):
            loss_options("avg")
    assert loss_options("sum", 3, 0.25) == loss_options("sum", 3, 0.25)
    assert loss_options("sum", 3, 0.25).label_smoothing == 0.25
    assert type(loss_options("mean", -100, 1).label_smoothing) is float  # an int 1 normalised, not confused with True
    eps = torch.tensor(0.1)
    assert loss_options("mean", -100, eps).label_smoothing == pytest.approx(0.1)
    eps.fill_(0.3)
    assert loss_options("mean", -100, eps).label_smoothing == pytest.approx(0.3)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    for smoothing in (0.0, 0.2, 0.0):
        torch.testing.assert_close(torch_xent.cross_entropy(x, y, label_smoothing=smoothing),
                                   F.cross_entropy(x, y, label_smoothing=smoothing))


SMALL_IMPLS = ["aten", "auto"] + (["native"] if torch_xent.native_available("cpu") else [])


@pytest.mark.parametrize("impl", SMALL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_plain_cpu_problems(impl, dtype, monkeypatch):
    """A CPU problem in its common form (2-D logits, int64 targets, no class weights) takes a short way
    to its op (functional._plain_cpu_loss), past the general checks: the same values, gradients and
    errors as F.cross_entropy; with the native kernel, the loss without a gradient is the one with it,
    bit for bit."""
    from torch_xent import aten, functional

    monkeypatch.setattr(aten, "TORCH_LOSS_ELEMENTS", aten.SMALL_ELEMENTS)  # the default, which conftest turns off

    def general_way(*args, **kwargs):
        raise AssertionError("the general way ran")

    with monkeypatch.context() as m:  # valid input never reaches the general checks
        m.setattr(functional._checks, "check_logits", general_way)
        torch_xent.cross_entropy(torch.randn(5, 3, dtype=dtype), torch.tensor([0, 1, 2, 1, 0]), impl=impl)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, 6, generator=gen).to(dtype)
    y = torch.randint(0, 6, (37,), generator=gen)
    y[::5] = 2
    for kw in ({}, {"reduction": "sum"}, {"reduction": "none"}, {"ignore_index": 2, "label_smoothing": 0.15},
               {"ignore_index": 2, "reduction": "none"}):
        with torch.no_grad():
            alone = torch_xent.cross_entropy(x, y, impl=impl, **kw)
        assert alone.grad_fn is None and alone.dtype == dtype
        assert_close(alone, F.cross_entropy(x.double(), y, **kw).to(dtype), dtype)
        xg = x.clone().requires_grad_()
        loss = torch_xent.cross_entropy(xg, y, impl=impl, **kw)
        assert loss.grad_fn is not None
        if impl != "aten":  # the native kernel both ways
            assert torch.equal(alone, loss.detach())
        xr = x.double().requires_grad_()
        ref = F.cross_entropy(xr, y, **kw)
        up = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
        (g,) = torch.autograd.grad(loss, xg, up.to(dtype))
        (gr,) = torch.autograd.grad(ref, xr, up)
        assert_close(g, gr.to(dtype), dtype)
    # Bad input: PyTorch's exceptions, whether the short way sees them or the general one.
    bad = y.clone()
    bad[3] = 6
    with pytest.raises(IndexError, match="Target 6 is out of bounds"):
        torch_xent.cross_entropy(x, bad, impl=impl)
    with pytest.raises(ValueError, match=r"Expected input batch_size \(37\) to match target batch_size \(36\)"):
        torch_xent.cross_entropy(x, y[:36], impl=impl)
    with pytest.raises(RuntimeError, match="expected target dtype to be Long or Byte"):
        torch_xent.cross_entropy(x, y.int(), impl=impl)
    with pytest.raises(NotImplementedError, match="logits must be floating point"):
        torch_xent.cross_entropy(y.reshape(37, 1).expand(37, 6).contiguous(), y, impl=impl)
    with pytest.raises(TypeError, match="target must be a Tensor"):
        torch_xent.cross_entropy(x, [1, 2, 3], impl=impl)
