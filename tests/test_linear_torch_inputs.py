"""torch_xent.linear_cross_entropy and torch_xent.LinearCrossEntropyLoss on PyTorch's own test inputs
for F.linear_cross_entropy and nn.LinearCrossEntropyLoss (torch.testing._internal): every OpInfo sample
of the plain, ``chunked`` and ``chunked_none`` variants and their error inputs, and the module_db
entry's inputs and error inputs, on impl native and reference. A new torch release brings its cases.

The oracle is PyTorch's own unfused path (``options=None``) in float64.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import torch_xent
from helpers import TOL

common_methods_invocations = pytest.importorskip("torch.testing._internal.common_methods_invocations")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

IMPLS = ["reference"] + (["native"] if torch_xent.native_available("cpu") else [])
OPINFOS = {op.variant_test_name or "plain": op for op in common_methods_invocations.op_db
           if op.name == "nn.functional.linear_cross_entropy"}
MODULE_INFO = next((m for m in common_modules.module_db if m.module_cls is getattr(torch.nn, "LinearCrossEntropyLoss",
                                                                                    None)), None)
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
pytestmark = pytest.mark.skipif(not OPINFOS, reason="this torch has no linear_cross_entropy OpInfo")


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


def _check_sample(fn_ours, fn_oracle, tensors, dtype, what):
    """tensors: name -> tensor (those with requires_grad are differentiated)."""
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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(OPINFOS))
def test_opinfo_samples(variant, dtype, impl):
    op = OPINFOS[variant]
    torch.manual_seed(0)
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples
    for i, sample in enumerate(samples):
        kwargs = dict(sample.kwargs)
        tensors = {"input": sample.input, "linear_weight": sample.args[0], "target": sample.args[1],
                   "linear_bias": kwargs.pop("linear_bias", None), "weight": kwargs.pop("weight", None)}
        options = kwargs.pop("options", None)

        def ours(**t):
            return torch_xent.linear_cross_entropy(**t, options=options, impl=impl, **kwargs)

        def oracle(**t):
            return F.linear_cross_entropy(**t, **kwargs)

        what = (f"sample {i}: input {tuple(sample.input.shape)} weight {tuple(sample.args[0].shape)} target "
                f"{tuple(sample.args[1].shape)} {sample.args[1].dtype} {kwargs} options={options}")
        _check_sample(ours, oracle, tensors, dtype, what)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", list(OPINFOS))
def test_opinfo_error_inputs(variant, impl):
    errors = list(OPINFOS[variant].error_inputs("cpu"))
    assert errors
    for err in errors:
        s = err.sample_input
        with pytest.raises(err.error_type, match=err.error_regex):
            torch_xent.linear_cross_entropy(s.input, *s.args, impl=impl, **s.kwargs)


def _module_inputs(dtype):
    torch.manual_seed(0)
    return MODULE_INFO.module_inputs_func(MODULE_INFO, device="cpu", dtype=dtype, requires_grad=True, training=True)


needs_module_info = pytest.mark.skipif(MODULE_INFO is None, reason="this torch has no LinearCrossEntropyLoss ModuleInfo")


# The module's 857 inputs are many: float64 through the reference, float32 through the compiled kernel.
MODULE_CASES = [(torch.float64, "reference")] + [(torch.float32, impl) for impl in IMPLS if impl != "reference"]


@needs_module_info
@pytest.mark.parametrize("dtype,impl", MODULE_CASES, ids=[f"{d}-{i}" for d, i in MODULE_CASES])
def test_module_db_inputs(dtype, impl):
    """Each constructor and forward input of nn.LinearCrossEntropyLoss: torch_xent's module built with
    the same arguments and loaded with the PyTorch module's state dict gives its loss and gradients."""
    inputs = _module_inputs(dtype)
    assert inputs
    for i, mi in enumerate(inputs):
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        input, target = mi.forward_input.args
        theirs = torch.nn.LinearCrossEntropyLoss(*args, **kwargs)
        ours = torch_xent.LinearCrossEntropyLoss(*args, **kwargs, impl=impl)
        ours.load_state_dict(theirs.state_dict())
        theirs.options = None  # the oracle: PyTorch's unfused path
        theirs64 = theirs.to(torch.float64)
        what = f"module input {i}: {args} {kwargs}, input {tuple(input.shape)} target {tuple(target.shape)}"

        def fn_ours(input, target, linear_weight, linear_bias):
            return _forward_with(ours, input, target, linear_weight, linear_bias)

        def fn_theirs(input, target, linear_weight, linear_bias):
            return _forward_with(theirs64, input, target, linear_weight, linear_bias)

        params = {"linear_weight": ours.linear.weight, "linear_bias": ours.linear.bias}
        _check_sample(fn_ours, fn_theirs, {"input": input, "target": target, **params}, dtype, what)


def _forward_with(module, input, target, linear_weight, linear_bias):
    """module(input, target) with its classifier's parameters replaced by the given tensors."""
    return torch.func.functional_call(module, {"linear.weight": linear_weight, "linear.bias": linear_bias}
                                      if linear_bias is not None else {"linear.weight": linear_weight},
                                      (input, target))


@needs_module_info
@pytest.mark.parametrize("impl", IMPLS)
def test_module_db_error_inputs(impl):
    errors = MODULE_INFO.module_error_inputs_func(MODULE_INFO, device="cpu", dtype=torch.float32,
                                                  requires_grad=True, training=True)
    assert errors
    enum = common_modules.ModuleErrorEnum
    for err in errors:
        mi = err.module_error_input
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        if err.error_on == enum.CONSTRUCTION_ERROR:
            with pytest.raises(err.error_type, match=err.error_regex):
                torch_xent.LinearCrossEntropyLoss(*args, **kwargs, impl=impl)
        else:
            module = torch_xent.LinearCrossEntropyLoss(*args, **kwargs, impl=impl)
            with pytest.raises(err.error_type, match=err.error_regex):
                module(*mi.forward_input.args, **mi.forward_input.kwargs)


def test_state_dict_round_trip():
    """A state dict moves between torch_xent's module and PyTorch's both ways, K-dimensional and biased."""
    for kw in (dict(), dict(bias=True, out_features=(3, 2), weight=torch.rand(5) + 0.5)):
        theirs = torch.nn.LinearCrossEntropyLoss(4, 5, **kw)
        ours = torch_xent.LinearCrossEntropyLoss(4, 5, **kw)
        assert set(ours.state_dict()) == set(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict())
        for name, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[name], value)
        with torch.no_grad():
            ours.linear.weight.mul_(2.0)
        theirs.load_state_dict(ours.state_dict())
        assert torch.equal(theirs.linear.weight, ours.linear.weight)
        x = torch.randn(6, 4)
        t = torch.randint(0, 5, (6, *kw.get("out_features", ())))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(ours(x, t), theirs(x, t))
