"""The fast pure-PyTorch path (torch_xent/aten.py, impl="aten") as an op: the table of test_ops.py
against torch_xent/reference.py (dtypes x options x shapes x reductions, with and without gradient, in
place), over chunk sizes down to one row a chunk; edge values; the accelerator behaviour (no host
reads: NaN rows for out-of-range targets), run here on the CPU; torch.compile from a fresh process;
and the choice of implementation (a function of what was built and validated, checked without a GPU).

Through torch_xent.cross_entropy, impl="aten" also runs every table of test_cross_entropy.py
(conftest.impls_for lists it on every device).
"""

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import torch_xent
from helpers import edge_value_problem, minus_inf_chunks_problem, DTYPES, assert_close, assert_matches_reference, make_problem, op_options
from test_ops import OPTIONS, SHAPES
from torch_xent import LossOptions, _config, _native, aten, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

@pytest.fixture
def budget(monkeypatch):
    """set_rows(rows, C, itemsize): chunks of ``rows`` rows (None: the default budget) for the test."""

    def set_rows(rows, num_classes, itemsize):
        if rows is None:
            return
        value = max(1, rows * num_classes * itemsize)
        monkeypatch.setattr(aten, "CPU_CHUNK_BYTES", value)
        monkeypatch.setattr(aten, "CPU_HALF_CHUNK_BYTES", value)
        monkeypatch.setattr(aten, "DEVICE_CHUNK_BYTES", value)

    return set_rows


# float16 takes bfloat16's code path (both are computed in float32); test_edge_values covers it.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("option", list(OPTIONS))
def test_forward_matches_reference(device, dtype, shape, option, budget):
    opts = OPTIONS[option]
    logits, target, weight = make_problem(shape, dtype, device, opts)
    itemsize = 8 if dtype == torch.float64 else 4
    # Each reduction with another chunking (the default, one row a chunk, 3 rows: a partial last
    # chunk) and another second variant: no gradient, in place, no host reads (the accelerator path).
    for reduction, rows, variant in ((0, None, "no grad"), (1, 1, "in place"), (2, 3, "no host reads")):
        budget(rows, shape[1], itemsize)
        o = op_options(opts, reduction)
        what = f"reduction={reduction} rows={rows}"
        out = aten.cross_entropy_forward(logits, target, weight, o, True)
        assert_matches_reference(out, logits, target, weight, o, what=what)
        if variant == "no grad":
            loss, lse, grad = aten.cross_entropy_forward(logits, target, weight, o, False)
            assert grad.numel() == 0
            out = (loss, lse, None)
        elif variant == "in place":
            inplace = logits.clone()
            loss, lse, grad = aten.cross_entropy_forward(inplace, target, weight, o, True, inplace=True)
            assert grad is inplace
            out = (loss, lse, inplace)
        else:
            out = aten.cross_entropy_forward(logits, target, weight, o, True, host_reads=False)
        assert_matches_reference(out, logits, target, weight, o, compute_grad=variant != "no grad",
                                 what=f"{variant}, {what}")
        if rows is not None:  # the chunked code without a gradient too (one chunk takes log_softmax + nll_loss)
            loss, lse, _ = aten.cross_entropy_forward(logits, target, weight, o, False)
            assert_matches_reference((loss, lse, None), logits, target, weight, o, compute_grad=False,
                                     what=f"no grad, {what}")


# (N, C, S): K-dimensional input in its own layout, in chunks of positions of one batch item.
POSITION_SHAPES = [(2, 5, 7), (3, 19, 10), (1, 150, 4), (2, 3, 1), (9, 4, 3), (2, 6, 0), (0, 6, 5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", POSITION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_positions_match_reference(device, dtype, shape, option, budget):
    """(N, C, S) logits against the reference on the same problem as rows: (N, S) outputs, the
    gradient in the logits' layout, chunks of 1 and 3 positions (partial, never across items), of 12
    (several short items at a time) and the default, in place, without host reads, without the
    gradient or the lse."""
    opts = OPTIONS[option]
    n, c, s = shape
    logits, target, weight = make_problem(shape, dtype, device, opts)
    soft = target.is_floating_point()
    rows = logits.movedim(1, -1).reshape(-1, c)
    tgt = target.movedim(1, -1).reshape(-1, c) if soft else target.reshape(-1)
    itemsize = 8 if dtype == torch.float64 else 4
    # Chunks of 12 positions take 4 items of 3 at a time (copied to rows), the others positions of one item.
    for reduction, chunk, variant in ((0, None, "in place"), (1, 1, "no host reads"), (2, 3, "in place"),
                                      (0, 3, "no grad"), (1, 12, "in place"), (0, 12, "out of place")):
        budget(chunk, c, itemsize)
        o = op_options(opts, reduction)
        what = f"{shape} reduction={reduction} chunk={chunk} {variant}"
        if variant == "in place":
            buf = logits.clone()
            loss, lse, grad = aten.cross_entropy_forward(buf, target, weight, o, True, inplace=True)
            assert grad is buf, what
        else:
            loss, lse, grad = aten.cross_entropy_forward(logits, target, weight, o, variant != "no grad",
                                                         host_reads=False if variant == "no host reads" else None)
        assert lse.shape == (n, s) and loss.shape == ((n, s) if reduction == 0 else ()), what
        if variant == "no grad":
            assert grad.numel() == 0, what
            grad = None
        else:
            assert grad.shape == logits.shape and grad.is_contiguous(), what
            grad = grad.movedim(1, -1).reshape(-1, c).contiguous()
        out = (loss.reshape(-1) if reduction == 0 else loss, lse.reshape(-1), grad)
        assert_matches_reference(out, rows, tgt, weight, o, compute_grad=grad is not None, what=what)
    lean = aten.cross_entropy_forward(logits, target, weight, op_options(opts, 1), False, need_lse=False)
    if not opts.get("z_loss"):
        assert lean[1].numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("host_reads", [None, False], ids=["host", "no-host"])
def test_edge_values(device, dtype, host_reads, budget):
    c = 40
    logits, target = edge_value_problem(c, dtype, device)
    for rows in (None, 2):
        budget(rows, c, 8 if dtype == torch.float64 else 4)
        for reduction in (0, 1, 2):
            for opts in ({}, {"label_smoothing": 0.2}, {"z_loss": 1e-3}):
                o = op_options(opts, reduction)
                out = aten.cross_entropy_forward(logits, target, None, o, True, host_reads=host_reads)
                assert_matches_reference(out, logits, target, None, o, what=f"reduction={reduction} {opts}")
        loss, lse, grad = aten.cross_entropy_forward(logits, target, None, LossOptions("none"), True,
                                                     host_reads=host_reads)
        assert torch.isnan(loss[:3]).all() and torch.isnan(grad[:3]).all()
        assert torch.isfinite(loss[3]) and grad[3, 4] == 0
        assert torch.isposinf(loss[4])
        assert loss[5] == 0 and lse[5] == 0 and (grad[5] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_chunks_of_minus_inf_and_huge_logits(device):
    """Long rows whose first part is entirely -inf, and logits of magnitude 1e4 (exact in float32)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits, target, weight = minus_inf_chunks_problem(dtype, device)
        for opts in ({}, {"label_smoothing": 0.1}, {"label_smoothing": 0.1, "weight": True}):
            w = weight if opts.get("weight") else None
            for reduction in (0, 1):
                o = op_options(opts, reduction)
                out = aten.cross_entropy_forward(logits, target, w, o, True)
                # Against the float64 reference of the same values: at magnitude 1e4 the float32
                # reference rounds m + log_sum before exp(z - lse) (a relative error of 3e-4 in its
                # gradient); aten's log-probabilities are relative to the row max, as PyTorch's.
                exact = reference.cross_entropy_forward(logits.double(), target, None if w is None else w.double(), o)
                what = f"{dtype} {opts} reduction={reduction}"
                c = logits.shape[1]
                assert_close(out[0], exact[0], dtype, f"loss {what}", "acc", num_classes=c)
                assert_close(out[1], exact[1], dtype, f"lse {what}", "acc", num_classes=c)
                assert_close(out[2], exact[2], dtype, f"grad {what}", "grad")
        # A probability target that puts mass on a -inf logit: infinite loss, as in the reference.
        soft = torch.softmax(torch.randn(4, 6000), 1).to(dtype).to(device)
        out = aten.cross_entropy_forward(logits, soft, None, LossOptions("none"), True)
        exact = reference.cross_entropy_forward(logits.double(), soft.double(), None, LossOptions("none"))
        for got, want, kind in zip(out, exact, ("acc", "acc", "grad")):
            assert_close(got, want, dtype, f"soft target on -inf logits, {dtype}", kind, num_classes=6000)
        assert torch.isinf(out[0]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_ignored_and_empty(device, dtype):
    logits = torch.randn(5, 12, dtype=dtype, device=device)
    target = torch.full((5,), -100, device=device)
    for reduction, expect in (("none", torch.zeros(5)), ("mean", torch.tensor(float("nan"))),
                              ("sum", torch.tensor(0.0))):
        for host_reads in (None, False):
            loss, lse, grad = aten.cross_entropy_forward(logits, target, None, LossOptions(reduction, -100, 0.1),
                                                         True, host_reads=host_reads)
            torch.testing.assert_close(loss.cpu(), expect, equal_nan=True)
            assert (grad == 0).all() and (lse == 0).all()
    empty = torch.randn(0, 12, dtype=dtype, device=device)
    for reduction, expect in (("none", torch.zeros(0)), ("mean", torch.tensor(float("nan"))),
                              ("sum", torch.tensor(0.0))):
        for target in (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, 12, dtype=dtype, device=device)):
            loss, lse, grad = aten.cross_entropy_forward(empty, target, None, LossOptions(reduction), True)
            torch.testing.assert_close(loss.cpu(), expect, equal_nan=True)
            assert grad.shape == (0, 12) and lse.shape == (0,)


def test_out_of_range_target_on_the_cpu_raises_before_writing():
    logits = torch.randn(4, 5)
    for bad in (5, -1, 1 << 40):
        target = torch.tensor([0, bad, 1, -100])
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
            aten.cross_entropy_forward(logits, target, None, LossOptions(), True)
        before = logits.clone()
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
            aten.cross_entropy_forward(logits, target, None, LossOptions(), True, inplace=True)
        assert torch.equal(logits, before), "the in-place path wrote before it checked the targets"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [5, -3, 1 << 40])
@pytest.mark.parametrize("weighted", [False, True])
def test_out_of_range_target_without_host_reads_poisons_its_row(device, bad, weighted):
    """The accelerator behaviour: no error (that would need a synchronisation) and no read out of
    bounds; the row of an out-of-range target has a NaN loss and gradient, so the reduced loss is NaN,
    and every other row is right."""
    logits, target, weight = make_problem((6, 5), torch.float32, device, {"weight": weighted})
    target[2] = bad
    target[4] = -100
    good = torch.tensor([0, 1, 3, 4, 5], device=device)
    for inplace in (False, True):
        z = logits.clone()
        loss, lse, grad = aten.cross_entropy_forward(z, target, weight, LossOptions("none", label_smoothing=0.1),
                                                     True, inplace=inplace, host_reads=False)
        assert torch.isnan(loss[2]) and torch.isnan(lse[2]) and torch.isnan(grad[2]).all()
        ref = reference_rows(logits[good], target[good], weight, LossOptions("none", label_smoothing=0.1))
        assert_close(loss[good], ref[0], torch.float32, kind="acc", num_classes=5)
        assert_close(grad[good], ref[2], torch.float32, kind="grad")
        for reduction in ("mean", "sum"):
            total = aten.cross_entropy_forward(logits, target, weight, LossOptions(reduction), False,
                                               host_reads=False)[0]
            assert torch.isnan(total)


def reference_rows(logits, target, weight, opts):
    return reference.cross_entropy_forward(logits, target, weight, opts, True)


@pytest.mark.parametrize("device", DEVICES)
def test_through_the_module_with_out_of_range_target_without_host_reads(device, monkeypatch):
    """cross_entropy(impl="aten") where the host may not be read (as on CUDA): NaN loss, not an error."""
    monkeypatch.setattr(aten, "_host_reads_allowed", lambda dev: False)
    x = torch.randn(3, 4, device=device, requires_grad=True)
    loss = torch_xent.cross_entropy(x, torch.tensor([0, 4, 1], device=device), impl="aten")
    assert torch.isnan(loss)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isnan(g[1]).all()


# ---------------------------------------------------------------------------------------------
# torch.compile, from a fresh process (the first call is where lazy set-up goes wrong).

_COMPILE_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F, torch_xent

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(16, 32)
            self.fc2 = torch.nn.Linear(32, 10)

        def forward(self, x, y, fn):
            return fn(self.fc2(torch.relu(self.fc1(x))), y)

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(50, 16)
    y = torch.randint(0, 10, (50,))
    y[3] = -100
    ours = lambda z, t: torch_xent.cross_entropy(z, t, label_smoothing=0.05, z_loss=1e-3, impl="aten")
    theirs = lambda z, t: F.cross_entropy(z, t, label_smoothing=0.05) + 1e-3 * (
        torch.logsumexp(z, 1) ** 2 * (t != -100)).sum() / (t != -100).sum()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    for step in range(2):
        loss = compiled(x, y, ours)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        expect = model(x, y, theirs)
        expect_grads = torch.autograd.grad(expect, list(model.parameters()))
        torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
        for g, e in zip(grads, expect_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    soft = torch.softmax(torch.randn(50, 10), 1)
    f = torch.compile(lambda z, t: torch_xent.cross_entropy(z, t, softcap=5.0, impl="aten"), fullgraph=True)
    z = torch.randn(50, 10, requires_grad=True)
    torch.testing.assert_close(f(z, soft), F.cross_entropy(5.0 * torch.tanh(z / 5.0), soft))
    print("ok")
""")


def test_torch_compile_fullgraph_in_a_fresh_process():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("ok"), proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_no_host_synchronisation_on_cuda():
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (64,), device="cuda")
    y[0] = -100
    torch_xent.cross_entropy(x, y, impl="aten")  # lazy CUDA set-up outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kw in ({}, {"label_smoothing": 0.1}, {"reduction": "none"}):
            loss = torch_xent.cross_entropy(x, y, impl="aten", **kw)
            torch.autograd.grad(loss.sum(), x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expect = F.cross_entropy(x, y)
    assert_close(torch_xent.cross_entropy(x, y, impl="aten"), expect, torch.float32)


# ---------------------------------------------------------------------------------------------
# Which implementation impl="auto" runs: a function of what was built and what was validated.

@pytest.mark.parametrize("device", ["cpu", "cuda", "mps", "xpu"])
@pytest.mark.parametrize("built", [False, True])
@pytest.mark.parametrize("validated", [False, True])
def test_select_kernel(device, built, validated):
    kernel, why = _native.select_kernel("auto", device, built, validated)
    assert kernel == ("native" if built and validated else "aten")
    assert why
    assert _native.select_kernel("reference", device, built, validated)[0] == "reference"
    assert _native.select_kernel("aten", device, built, validated)[0] == "aten"
    if built:
        assert _native.select_kernel("native", device, built, validated)[0] == "native"
    else:
        with pytest.raises(RuntimeError, match=f"no compiled kernel for {device}"):
            _native.select_kernel("native", device, built, validated)
    with pytest.raises(ValueError, match="impl must be one of"):
        _native.select_kernel("fast", device, built, validated)


def test_cuda_kernel_is_not_the_default_until_validated(monkeypatch):
    """A CUDA build whose kernel has not passed the GPU suite: show_config() says the pure-PyTorch
    path runs, and why; flipping the one switch makes the kernel the default."""
    assert _native.CUDA_KERNEL_VALIDATED is False  # flipped only with the GPU run's record (docs/cuda.md)
    assert _native.kernel_validated("cpu") and not _native.kernel_validated("cuda")
    line = _config.describe_device("cuda", built=True, validated=_native.kernel_validated("cuda"), visible=True)
    assert "kernel built, not validated" in line and "uses the pure-PyTorch path (aten)" in line
    assert "not yet validated" in line
    monkeypatch.setattr(_native, "CUDA_KERNEL_VALIDATED", True)
    assert _native.kernel_validated("cuda")
    line = _config.describe_device("cuda", built=True, validated=_native.kernel_validated("cuda"), visible=True)
    assert "uses the native kernel" in line
    line = _config.describe_device("cuda", built=False, validated=False, visible=False)
    assert "kernel not built" in line and "pure-PyTorch path (aten)" in line


def test_show_config_names_the_path_that_runs():
    text = torch_xent.show_config(file=io.StringIO())
    cpu_kernel = "native kernel" if torch_xent.native_available("cpu") else "pure-PyTorch path (aten)"
    assert f"impl='auto' uses the {cpu_kernel}" in text
    assert "cuda: kernel " in text and "any other device: impl='auto' uses the pure-PyTorch path" in text


def test_auto_without_a_kernel_runs_aten(monkeypatch):
    """impl="auto" on a device without a compiled kernel goes through the aten path."""
    calls = []
    real = aten.cross_entropy_forward

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(aten, "cross_entropy_forward", spy)
    monkeypatch.setitem(_native._AVAILABLE, "cpu", False)  # as in a pure-Python install
    x = torch.randn(4, 3, requires_grad=True)
    loss = torch_xent.cross_entropy(x, torch.tensor([0, 1, 2, 0]))
    assert calls == [(4, 3)]
    assert_close(loss, F.cross_entropy(x, torch.tensor([0, 1, 2, 0])), torch.float32)


# --------------------------------------------------------------------------------------------------
# Small CPU problems: PyTorch's own loss (aten.runs_torch_loss), and which calls keep the fused code.

SMALL_CASES = {
    "2d": ((150, 3), {}, {}),
    "weighted-smoothed-ignore": ((64, 10), {"weight": True, "ignore_index": 2}, {"label_smoothing": 0.1}),
    "kdim": ((4, 5, 3, 7), {}, {"reduction": "none"}),
    "unbatched": ((7,), {}, {"reduction": "sum"}),
    "soft": ((32, 6), {"soft": True}, {}),
}


@pytest.mark.parametrize("case", sorted(SMALL_CASES))
def test_small_cpu_problems_run_torch_loss(case, monkeypatch):
    monkeypatch.setattr(aten, "TORCH_LOSS_ELEMENTS", aten.SMALL_ELEMENTS)  # the default, which conftest turns off
    shape, problem, kw = SMALL_CASES[case]
    x0, target, weight = make_problem(shape, torch.float64, opts=problem, seed=3)
    kw = dict(kw, weight=weight)
    if "ignore_index" in problem:
        kw["ignore_index"] = problem["ignore_index"]
    x = x0.clone().requires_grad_()
    loss = torch_xent.cross_entropy(x, target, impl="aten", **kw)
    assert "SoftmaxCrossEntropyFunction" not in type(loss.grad_fn).__name__
    x_ref = x0.clone().requires_grad_()
    expected = F.cross_entropy(x_ref, target, **kw)
    assert_close(loss, expected, torch.float64, "loss")
    (g,) = torch.autograd.grad(loss.sum(), x)
    (g_ref,) = torch.autograd.grad(expected.sum(), x_ref)
    assert_close(g, g_ref, torch.float64, "grad", kind="grad")
    with torch.no_grad():
        assert_close(torch_xent.cross_entropy(x0, target, impl="aten", **kw), expected, torch.float64, "no-grad loss")


@pytest.mark.parametrize("call", ["z_loss", "softcap", "with_lse", "inplace_backward", "large"])
def test_small_problem_keeps_the_fused_code_where_torch_cannot(call, monkeypatch):
    monkeypatch.setattr(aten, "TORCH_LOSS_ELEMENTS", aten.SMALL_ELEMENTS)
    rows = aten.SMALL_ELEMENTS // 10 + 1 if call == "large" else 16
    x = torch.randn(rows, 10, requires_grad=True) * 1.0  # not a leaf: inplace_backward may overwrite it
    t = torch.randint(0, 10, (rows,))
    kw = {"z_loss": {"z_loss": 1e-3}, "softcap": {"softcap": 5.0}, "inplace_backward": {"inplace_backward": True}}
    if call == "with_lse":
        loss, _ = torch_xent.cross_entropy_with_lse(x, t, impl="aten")
    else:
        loss = torch_xent.cross_entropy(x, t, impl="aten", **kw.get(call, {}))
    assert "SoftmaxCrossEntropyFunction" in type(loss.grad_fn).__name__


def test_small_problem_out_of_range_target_raises_like_torch(monkeypatch):
    monkeypatch.setattr(aten, "TORCH_LOSS_ELEMENTS", aten.SMALL_ELEMENTS)
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        torch_xent.cross_entropy(x, torch.tensor([0, 7, 1, 2]), impl="aten")
