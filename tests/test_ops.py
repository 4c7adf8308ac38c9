"""The compiled ops themselves (torch.ops.torch_xent.*): registration (opcheck), values against
torch_xent/reference.py over a table of dtypes x options x shapes, edge values, errors, in-place
gradients, torch.compile, gradcheck, every CPU instruction-set variant, and more than 2**31 logits.

Every test runs on each device whose native kernel is built: the CPU, and CUDA on a GPU machine.
Without a compiled kernel these tests are skipped (the reference is tested in test_cross_entropy.py).
"""

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_xent
from helpers import edge_value_problem, minus_inf_chunks_problem, DTYPES, assert_close, assert_matches_reference, make_problem, op_args, op_options
from torch_xent import LossOptions, reference

ops = torch.ops.torch_xent

NATIVE_DEVICES = [d for d in ["cpu", "cuda"]
                  if (d == "cpu" or torch.cuda.is_available()) and torch_xent.native_available(d)]
pytestmark = pytest.mark.skipif(not NATIVE_DEVICES, reason="no compiled torch_xent kernel is built")
device_params = pytest.mark.parametrize("device", NATIVE_DEVICES or ["cpu"])

# ---------------------------------------------------------------------------------------------
# Values against the reference: dtypes x options x shapes x reductions, with and without gradient,
# and the in-place op.

SHAPES = [(7, 1), (9, 3), (13, 10), (300, 7), (6, 15), (5, 16), (5, 17), (4, 33), (3, 1000), (3, 4097), (2, 50000), (0, 5)]
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": 1},
    "ignore-outside": {"ignore_index": -100},
    "smooth": {"label_smoothing": 0.1},
    "weight+smooth+ignore": {"weight": True, "label_smoothing": 0.3, "ignore_index": 0},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 4.0},
    "soft": {"soft": True},
    "soft+weight+smooth": {"soft": True, "weight": True, "label_smoothing": 0.15},
    "everything": {"weight": True, "label_smoothing": 0.2, "ignore_index": 2, "z_loss": 1e-2, "softcap": 2.5},
    "soft+everything": {"soft": True, "weight": True, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 2.5},
}


@device_params
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("option", list(OPTIONS))
def test_forward_matches_reference(device, dtype, shape, option):
    opts = OPTIONS[option]
    logits, target, weight = make_problem(shape, dtype, device, opts)
    for reduction in (0, 1, 2):
        o = op_options(opts, reduction)
        out = ops.cross_entropy_forward(logits, target, weight, reduction, *op_args(opts), True)
        assert_matches_reference(out, logits, target, weight, o, what=f"reduction={reduction}")
        loss, lse, grad = ops.cross_entropy_forward(logits, target, weight, reduction, *op_args(opts), False)
        assert grad.numel() == 0
        assert_matches_reference((loss, lse, None), logits, target, weight, o, what=f"no grad, {reduction}")
        inplace = logits.clone()
        loss, lse = ops.cross_entropy_forward_inplace(inplace, target, weight, reduction, *op_args(opts))
        assert_matches_reference((loss, lse, inplace), logits, target, weight, o, what=f"in place, {reduction}")


@device_params
def test_chunks_of_minus_inf_and_huge_logits(device):
    """Long rows whose first chunks are entirely -inf, and logits of magnitude 1e4 (exact in float32)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits, target, weight = minus_inf_chunks_problem(dtype, device)
        for opts in ({}, {"label_smoothing": 0.1}, {"label_smoothing": 0.1, "weight": True}):
            w = weight if opts.get("weight") else None
            for reduction in (0, 1):
                out = ops.cross_entropy_forward(logits, target, w, reduction, *op_args(opts), True)
                assert_matches_reference(out, logits, target, w, op_options(opts, reduction),
                                         what=f"{dtype} {opts} reduction={reduction}")
        # A probability target that puts mass on a -inf logit: infinite loss, as in the reference.
        soft = torch.softmax(torch.randn(4, 6000), 1).to(dtype).to(device)
        out = ops.cross_entropy_forward(logits, soft, None, 0, -100, 0.0, 0.0, 0.0, True)
        assert_matches_reference(out, logits, soft, None, LossOptions("none"), what="soft target on -inf logits")
        assert torch.isinf(out[0]).all()


@device_params
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [6, 40])  # the few-classes path and the general one
def test_edge_values(device, dtype, c):
    logits, target = edge_value_problem(c, dtype, device)
    for reduction in (0, 1, 2):
        for opts in ({}, {"label_smoothing": 0.2}, {"z_loss": 1e-3}):
            out = ops.cross_entropy_forward(logits, target, None, reduction, *op_args(opts), True)
            assert_matches_reference(out, logits, target, None, op_options(opts, reduction),
                                     what=f"reduction={reduction} {opts}")
    loss, lse, grad = ops.cross_entropy_forward(logits, target, None, 0, -100, 0.0, 0.0, 0.0, True)
    assert torch.isnan(loss[:3]).all() and torch.isnan(grad[:3]).all()
    assert torch.isfinite(loss[3]) and grad[3, 4] == 0
    assert torch.isposinf(loss[4])
    assert loss[5] == 0 and lse[5] == 0 and (grad[5] == 0).all()


@device_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_ignored_and_empty(device, dtype):
    logits = torch.randn(5, 12, dtype=dtype, device=device)
    target = torch.full((5,), -100, device=device)
    for reduction, expect in ((0, torch.zeros(5)), (1, torch.tensor(float("nan"))), (2, torch.tensor(0.0))):
        loss, lse, grad = ops.cross_entropy_forward(logits, target, None, reduction, -100, 0.1, 0.0, 0.0, True)
        torch.testing.assert_close(loss.cpu(), expect, equal_nan=True)
        assert (grad == 0).all() and (lse == 0).all()
    empty = torch.randn(0, 12, dtype=dtype, device=device)
    for reduction, expect in ((0, torch.zeros(0)), (1, torch.tensor(float("nan"))), (2, torch.tensor(0.0))):
        for target in (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, 12, dtype=dtype, device=device)):
            loss, lse, grad = ops.cross_entropy_forward(empty, target, None, reduction, -100, 0.0, 0.0, 0.0, True)
            torch.testing.assert_close(loss.cpu(), expect, equal_nan=True)
            assert grad.shape == (0, 12) and lse.shape == (0,)


@device_params
def test_deterministic(device):
    """The same input gives bit-identical results, whatever the number of threads."""
    logits, target, weight = make_problem((3000, 77), torch.float32, device, {"weight": True, "ignore_index": 0})
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, max(2, threads), 1):
            torch.set_num_threads(n)
            outs.append(ops.cross_entropy_forward(logits, target, weight, 1, 0, 0.1, 0.0, 0.0, True))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        for a, b in zip(out, outs[0]):
            assert torch.equal(a, b)


@pytest.mark.skipif("cpu" not in NATIVE_DEVICES, reason="the CPU kernel is not built")
def test_cpu_rows_run_in_parallel():
    """The extension's at::parallel_for really uses torch's threads (it runs serially when the
    extension is compiled without the OpenMP that torch's parallel backend is built on)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ops.cpu_parallel_threads(64) == 2
        torch.set_num_threads(1)
        assert ops.cpu_parallel_threads(64) == 1
    finally:
        torch.set_num_threads(threads)
    assert ops.cpu_parallel_threads(0) == 0
    text = torch_xent.show_config(file=io.StringIO())
    assert f"in parallel on {torch_xent._native.cpu_parallel_threads()} of {threads} threads" in text


# ---------------------------------------------------------------------------------------------
# Errors.

@device_params
def test_out_of_range_target(device):
    logits = torch.randn(4, 5, device=device)
    for bad in (5, -1, 1 << 40):
        target = torch.tensor([0, bad, 1, -100], device=device)
        if device == "cpu":
            with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
                ops.cross_entropy_forward(logits, target, None, 1, -100, 0.0, 0.0, 0.0, True)
            before = logits.clone()
            with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
                ops.cross_entropy_forward_inplace(logits, target, None, 1, -100, 0.0, 0.0, 0.0)
            assert torch.equal(logits, before), "the in-place op wrote before it checked the targets"
        else:  # the GPU cannot raise without a sync: that row is NaN, the others are right
            loss, lse, grad = ops.cross_entropy_forward(logits, target, None, 0, -100, 0.0, 0.0, 0.0, True)
            assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
            assert torch.isfinite(loss[[0, 2]]).all()


@device_params
def test_argument_errors(device):
    z = torch.randn(4, 5, device=device)
    y = torch.tensor([0, 1, 2, 3], device=device)
    f = ops.cross_entropy_forward
    cases = [
        (lambda: f(z[0], y[:1], None, 1, -100, 0.0, 0.0, 0.0, True), "2-D"),
        (lambda: f(z, y.int(), None, 1, -100, 0.0, 0.0, 0.0, True), "int64"),
        (lambda: f(z, y[:3], None, 1, -100, 0.0, 0.0, 0.0, True), "shape"),
        (lambda: f(z, z.double(), None, 1, -100, 0.0, 0.0, 0.0, True), "dtype"),
        (lambda: f(z, y, torch.ones(4, device=device), 1, -100, 0.0, 0.0, 0.0, True), "weight"),
        (lambda: f(z, y, torch.ones(5, dtype=torch.float64, device=device), 1, -100, 0.0, 0.0, 0.0, True), "weight"),
        (lambda: f(z, y, None, 3, -100, 0.0, 0.0, 0.0, True), "reduction"),
        (lambda: f(z, y, None, 1, -100, 1.5, 0.0, 0.0, True), "label_smoothing"),
        (lambda: f(z, y, None, 1, -100, 0.0, 0.0, -1.0, True), "softcap"),
        (lambda: f(z, y, None, 1, -100, 0.0, 0.0, float("inf"), True), "softcap must be finite"),
        (lambda: f(z[:, :0], y, None, 1, -100, 0.0, 0.0, 0.0, True), "0 classes"),
        (lambda: f(z[:0, :0], y[:0], None, 1, -100, 0.0, 0.0, 0.0, True), "0 classes"),
        (lambda: f(z.long(), y, None, 1, -100, 0.0, 0.0, 0.0, True), "float"),
        (lambda: ops.cross_entropy_forward_inplace(z[:, :4].t(), y, None, 1, -100, 0.0, 0.0, 0.0), "contiguous"),
    ]
    for call, words in cases:
        with pytest.raises(RuntimeError, match=words):
            call()


@device_params
def test_non_contiguous_inputs(device):
    base = torch.randn(12, 8, device=device)
    logits = base.t().contiguous().t()[:, :5]  # strided rows
    target = torch.randint(0, 5, (24,), device=device)[::2]
    out = ops.cross_entropy_forward(logits, target, None, 1, -100, 0.0, 0.0, 0.0, True)
    assert_matches_reference(out, logits.contiguous(), target.contiguous(), None, LossOptions("mean"))


# ---------------------------------------------------------------------------------------------
# Registration: opcheck on every op.

def _opcheck_cases(device):
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for opts in ({}, {"weight": True, "label_smoothing": 0.1, "ignore_index": 1}, {"soft": True},
                     {"z_loss": 1e-3, "softcap": 3.0}):
            for reduction in (0, 1, 2):
                logits, target, weight = make_problem((6, 11), dtype, device, opts)
                cases.append((logits, target, weight, reduction, opts))
    return cases


@device_params
def test_opcheck_forward(device):
    for logits, target, weight, reduction, opts in _opcheck_cases(device):
        for compute_grad in (True, False):
            x = logits.clone().requires_grad_(compute_grad)
            torch.library.opcheck(ops.cross_entropy_forward.default,
                                  (x, target, weight, reduction, *op_args(opts), compute_grad))


@device_params
def test_opcheck_forward_inplace_and_backward(device):
    for logits, target, weight, reduction, opts in _opcheck_cases(device):
        torch.library.opcheck(ops.cross_entropy_forward_inplace.default,
                              (logits.clone(), target, weight, reduction, *op_args(opts)))
    grad = torch.randn(6, 11, device=device)
    for grad_output in (torch.tensor(0.5, device=device), torch.rand(6, device=device)):
        torch.library.opcheck(ops.cross_entropy_backward.default, (grad, grad_output))


# ---------------------------------------------------------------------------------------------
# Through torch_xent.cross_entropy(impl="native"): autograd, in-place gradients, compile, gradcheck.

@device_params
def test_inplace_backward_matches(device):
    torch.manual_seed(0)
    x = torch.randn(64, 20, device=device)
    lin = torch.nn.Linear(20, 37).to(device)
    y = torch.randint(0, 37, (64,), device=device)
    grads = []
    for inplace in (False, True):
        lin.zero_grad()
        logits = lin(x)
        loss = torch_xent.cross_entropy(logits, y, label_smoothing=0.1, inplace_backward=inplace, impl="native")
        loss.backward()
        grads.append((loss.detach(), lin.weight.grad.clone(), lin.bias.grad.clone()))
        if inplace:  # the logits now hold d loss / d logits
            expect = reference.cross_entropy_forward(lin(x).detach(), y, None, LossOptions(label_smoothing=0.1))[2]
            torch.testing.assert_close(logits.detach(), expect, rtol=2e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


@device_params
def test_inplace_backward_version_counter(device):
    """An op that saved the logits must notice that the in-place gradient overwrote them."""
    a = torch.randn(8, 6, device=device, requires_grad=True)
    logits = a.exp()  # exp saves its output for the backward
    loss = torch_xent.cross_entropy(logits, torch.randint(0, 6, (8,), device=device), inplace_backward=True,
                                    impl="native")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


class _SmallModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x, y):
        logits = self.fc2(torch.relu(self.fc1(x)))
        return torch_xent.cross_entropy(logits, y, label_smoothing=0.05, impl="native")


@device_params
def test_torch_compile_fullgraph(device):
    torch.manual_seed(0)
    model = _SmallModel().to(device)
    x = torch.randn(50, 16, device=device)
    y = torch.randint(0, 10, (50,), device=device)
    y[3] = -100
    eager_loss = model(x, y)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    loss = compiled(x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


GRADCHECK_OPTIONS = {
    "plain": {},
    "weight+smooth+ignore": {"weight": True, "label_smoothing": 0.2, "ignore_index": 1},
    "z_loss+softcap": {"z_loss": 0.05, "softcap": 2.0},
    "soft+weight+smooth": {"soft": True, "weight": True, "label_smoothing": 0.1},
}


@device_params
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("option", list(GRADCHECK_OPTIONS))
def test_gradcheck_native(device, reduction, option):
    opts = GRADCHECK_OPTIONS[option]
    logits, target, weight = make_problem((5, 7), torch.float64, device, dict(opts, scale=1.0))
    ignore_index, eps, z_loss, softcap = op_args(opts)
    inputs = [logits.requires_grad_()]
    if opts.get("soft"):
        inputs.append(target.requires_grad_())

    def fn(*args):
        tgt = args[1] if len(args) > 1 else target
        return torch_xent.cross_entropy(args[0], tgt, weight, ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=eps, z_loss=z_loss, softcap=softcap or None, impl="native")

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------------
# Every CPU instruction-set variant of the kernel (ATen's capability decides which one runs).

_VARIANT_SCRIPT = textwrap.dedent("""
    import torch, torch_xent
    from helpers import assert_matches_reference
    from torch_xent import LossOptions
    print("capability", torch.backends.cpu.get_cpu_capability())
    print("variant", torch_xent._native.cpu_kernel_variant())
    ops = torch.ops.torch_xent
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for m, c in ((37, 3), (9, 31), (4, 2500), (3, 4100)):
            z = (torch.randn(m, c, generator=gen) * 3).to(dtype)
            z[0, 1] = float("-inf")
            if c > 2048:  # a NaN among -inf: the kernel's first chunk (of 2048 or 1024) has no finite max
                z[1, :2048] = float("-inf")
                z[1, 7] = float("nan")
            elif c > 16:  # a NaN among finite logits
                z[1, 5] = float("nan")
            y = torch.randint(0, c, (m,), generator=gen)
            y[2] = -100
            w = (torch.rand(c, generator=gen) + 0.5).to(dtype)
            soft = torch.softmax(torch.randn(m, c, generator=gen), 1).to(dtype)
            for t, wt, eps, zl, cap in ((y, None, 0.0, 0.0, 0.0), (y, w, 0.2, 1e-3, 0.0), (y, None, 0.1, 0.0, 3.0),
                                        (soft, w, 0.1, 0.0, 0.0), (soft, None, 0.0, 1e-3, 2.0)):
                for red in (0, 1):
                    out = ops.cross_entropy_forward(z, t, wt, red, -100, eps, zl, cap, True)
                    opts = LossOptions(("none", "mean")[red], -100, eps, zl, cap or None)
                    assert_matches_reference(out, z, t, wt, opts, what=f"{dtype} {m}x{c} {opts}")
    print("ok")
""")


def _cpu_has_flag(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def _cpu_variants():
    best = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    if best not in order:  # not an x86 CPU: only the portable variant exists
        return [best]
    variants = order[:order.index(best) + 1]
    if best == "AVX512" and _cpu_has_flag("avx512_bf16"):
        variants.append("AVX512_BF16")  # bfloat16 with the AVX512_BF16 conversions
    return variants


@pytest.mark.skipif("cpu" not in NATIVE_DEVICES, reason="the CPU kernel is not built")
@pytest.mark.parametrize("variant", _cpu_variants())
def test_cpu_instruction_set_variants(variant):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    capability = variant.split("_")[0]
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower(),
               TORCH_XENT_AVX512_BF16="1" if variant == "AVX512_BF16" else "0",
               PYTHONPATH=os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"capability {capability}\nvariant {variant}\n" in proc.stdout, proc.stdout
    assert proc.stdout.rstrip().endswith("ok"), proc.stdout


# ---------------------------------------------------------------------------------------------
# More than 2**31 logits: 64-bit offsets in the reads and in the gradient writes.

def _available_memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@pytest.mark.slow
@device_params
def test_more_than_2_pow_31_logits(device):
    c = 50000
    m = 2**31 // c + 1  # 42950 rows: 2,147,500,000 logits, 4.3 GB of bfloat16
    need = m * c * 2
    if device == "cpu":
        avail = _available_memory_bytes()
        if avail is not None and avail < need + (2 << 30):
            pytest.skip(f"needs {need / 2**30:.1f} GiB of free memory and some room")
    else:
        free, _ = torch.cuda.mem_get_info()
        if free < need + (1 << 30):
            pytest.skip("not enough GPU memory")
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(m, c, dtype=torch.bfloat16, device=device)
    for r in range(0, m, 4096):  # fill in slices: no float32 copy of the whole tensor
        logits[r:r + 4096].normal_(generator=gen)
    target = torch.randint(0, c, (m,), device=device, generator=gen)
    rows = torch.tensor([0, 1, m // 2, m - 2, m - 1], device=device)
    target[m - 1] = c - 1
    logits[m - 1, c - 1] = 7.0  # the very last element is the target of the very last row
    expect = reference.cross_entropy_forward(logits[rows], target[rows], None, LossOptions("none"))
    loss, lse, grad = ops.cross_entropy_forward(logits, target, None, 0, -100, 0.0, 0.0, 0.0, False)
    assert grad.numel() == 0
    for got, want in zip((loss[rows], lse[rows]), expect):
        assert_close(got, want, torch.bfloat16, kind="acc", num_classes=c)
    # The in-place op writes the gradient over all 2**31+ elements without a second buffer.
    loss, lse = ops.cross_entropy_forward_inplace(logits, target, None, 0, -100, 0.0, 0.0, 0.0)
    for got, want, kind in zip((loss[rows], lse[rows], logits[rows]), expect, ("acc", "acc", "grad")):
        assert_close(got, want, torch.bfloat16, kind=kind, num_classes=c)
