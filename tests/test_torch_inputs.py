"""torch_xent on PyTorch's own test inputs (torch.testing._internal), on impl native and reference
(cross-entropy also on aten):

- cross_entropy / CrossEntropyLoss: the OpInfo samples of ``nn.functional.cross_entropy`` and the
  module_db inputs and error inputs of ``nn.CrossEntropyLoss``;
- linear_cross_entropy / LinearCrossEntropyLoss: every OpInfo sample of the plain, ``chunked`` and
  ``chunked_none`` variants of ``nn.functional.linear_cross_entropy`` and their error inputs, and the
  module_db entry's inputs and error inputs of ``nn.LinearCrossEntropyLoss``.

A new torch release brings its new cases. The oracle is PyTorch's own function in float64 (for
linear cross-entropy its unfused path, ``options=None``).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import torch_xent
from helpers import check_against_oracle

common_methods_invocations = pytest.importorskip("torch.testing._internal.common_methods_invocations")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

IMPLS = ["reference"] + (["native"] if torch_xent.native_available("cpu") else [])
CE_IMPLS = ["aten"] + IMPLS  # linear_cross_entropy has no aten path of its own (its chunks run native or reference)
OPINFOS = {op.variant_test_name or "plain": op for op in common_methods_invocations.op_db
           if op.name == "nn.functional.linear_cross_entropy"}
CE_OPINFOS = [op for op in common_methods_invocations.op_db if op.name == "nn.functional.cross_entropy"]


def _module_info(cls):
    return next((m for m in common_modules.module_db if cls is not None and m.module_cls is cls), None)


MODULE_INFO = _module_info(getattr(torch.nn, "LinearCrossEntropyLoss", None))
CE_MODULE_INFO = _module_info(torch.nn.CrossEntropyLoss)
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
needs_linear_opinfo = pytest.mark.skipif(not OPINFOS, reason="this torch has no linear_cross_entropy OpInfo")


@pytest.mark.skipif(not CE_OPINFOS, reason="this torch has no cross_entropy OpInfo")
@pytest.mark.parametrize("impl", CE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_opinfo_samples(dtype, impl):
    for op in CE_OPINFOS:
        torch.manual_seed(0)
        samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
        assert samples
        for i, sample in enumerate(samples):
            kwargs = dict(sample.kwargs)
            tensors = {"input": sample.input, "target": sample.args[0], "weight": kwargs.pop("weight", None)}

            def ours(**t):
                return torch_xent.cross_entropy(**t, impl=impl, **kwargs)

            def oracle(**t):
                return F.cross_entropy(**t, **kwargs)

            what = f"sample {i}: input {tuple(sample.input.shape)} target {tuple(sample.args[0].shape)} {kwargs}"
            check_against_oracle(ours, oracle, tensors, dtype, what)


@pytest.mark.skipif(CE_MODULE_INFO is None, reason="this torch has no CrossEntropyLoss ModuleInfo")
@pytest.mark.parametrize("impl", CE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cross_entropy_module_db(dtype, impl):
    torch.manual_seed(0)
    inputs = CE_MODULE_INFO.module_inputs_func(CE_MODULE_INFO, device="cpu", dtype=dtype, requires_grad=True,
                                               training=True)
    assert inputs
    for i, mi in enumerate(inputs):
        kwargs = mi.constructor_input.kwargs
        ours = torch_xent.CrossEntropyLoss(**kwargs, impl=impl)
        theirs = torch.nn.CrossEntropyLoss(**kwargs).to(torch.float64)
        ours.load_state_dict(torch.nn.CrossEntropyLoss(**kwargs).state_dict())
        input, target = mi.forward_input.args
        check_against_oracle(lambda input, target: ours(input, target), lambda input, target: theirs(input, target),
                             {"input": input, "target": target}, dtype, f"module input {i}: {kwargs}")
    errors = CE_MODULE_INFO.module_error_inputs_func(CE_MODULE_INFO, device="cpu", dtype=dtype, requires_grad=True,
                                                     training=True)
    for err in errors:
        mi = err.module_error_input
        with pytest.raises(err.error_type, match=err.error_regex):
            module = torch_xent.CrossEntropyLoss(**mi.constructor_input.kwargs, impl=impl)
            module(*mi.forward_input.args, **mi.forward_input.kwargs)


@needs_linear_opinfo
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(OPINFOS))
def test_linear_opinfo_samples(variant, dtype, impl):
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
        check_against_oracle(ours, oracle, tensors, dtype, what)


@needs_linear_opinfo
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", list(OPINFOS))
def test_linear_opinfo_error_inputs(variant, impl):
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
def test_linear_module_db_inputs(dtype, impl):
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
        check_against_oracle(fn_ours, fn_theirs, {"input": input, "target": target, **params}, dtype, what)


def _forward_with(module, input, target, linear_weight, linear_bias):
    """module(input, target) with its classifier's parameters replaced by the given tensors."""
    return torch.func.functional_call(module, {"linear.weight": linear_weight, "linear.bias": linear_bias}
                                      if linear_bias is not None else {"linear.weight": linear_weight},
                                      (input, target))


@needs_module_info
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_module_db_error_inputs(impl):
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


@needs_module_info
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
