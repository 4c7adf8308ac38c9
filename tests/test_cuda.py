"""CUDA-kernel specific tests: every launch configuration (several rows per block, a block per row,
a cluster of blocks per row), misaligned rows, out-of-range targets, determinism, streams, no host
synchronisation, and rows past 2**31 elements. Compared with torch_xent.reference (the oracle).

Skipped (never failed) without a GPU or without the compiled CUDA kernel.
"""

import math

import pytest
import torch

import torch_xent
from torch_xent import reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch_xent.native_available("cuda")),
    reason="needs a GPU and the compiled CUDA kernel")

OPS = torch.ops.torch_xent
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (rtol, atol) for loss / lse, and for the gradient (whose entries are ~1/C or smaller).
LOSS_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-5, 1e-5),
            torch.float16: (1e-5, 1e-5)}
GRAD_TOL = {torch.float64: (1e-9, 1e-13), torch.float32: (2e-5, 1e-8), torch.bfloat16: (1.6e-2, 1e-6),
            torch.float16: (2e-3, 1e-7)}

# Class counts that reach each launch path for 4-byte logits: one group of threads per row
# (<= 128 16-byte slots), one block per row, and (sm_90) a cluster of 2, 5 and 8 blocks per row.
# Odd counts misalign every other row; tiny ones leave most lanes idle.
CLASSES = [1, 3, 10, 127, 509, 1000, 4096, 16385, 20000, 70001, 131072 + 3]


def make_inputs(m, c, dtype, gen, soft=False, weight=False, ignore_index=None, scale=4.0):
    logits = (torch.randn(m, c, generator=gen, dtype=torch.float64) * scale).to(dtype).cuda()
    if soft:
        target = torch.rand(m, c, generator=gen, dtype=torch.float64)
        target = (target / target.sum(1, keepdim=True)).to(dtype).cuda()
    else:
        target = torch.randint(0, c, (m,), generator=gen)
        if ignore_index is not None:
            target[torch.rand(m, generator=gen) < 0.3] = ignore_index
        target = target.cuda()
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.25).to(dtype).cuda() if weight else None
    return logits, target, w


def check_against_reference(logits, target, weight, reduction, ignore_index=-100, label_smoothing=0.0,
                            z_loss=0.0, softcap=0.0, compute_grad=True):
    dtype = logits.dtype
    loss, lse, grad = OPS.cross_entropy_forward(logits, target, weight, reduction, ignore_index, label_smoothing,
                                                z_loss, softcap, compute_grad)
    rloss, rlse, rgrad = reference.cross_entropy_forward(logits, target, weight, reduction, ignore_index,
                                                         label_smoothing, z_loss, softcap or None, compute_grad)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and lse.dtype == acc
    assert loss.shape == rloss.shape and lse.shape == rlse.shape
    rtol, atol = LOSS_TOL[dtype]
    torch.testing.assert_close(loss, rloss, rtol=rtol, atol=atol * max(1.0, math.log(logits.shape[1] + 1)),
                               equal_nan=True)
    torch.testing.assert_close(lse, rlse, rtol=rtol, atol=atol, equal_nan=True)
    if compute_grad:
        assert grad.dtype == dtype and grad.shape == logits.shape and grad.is_contiguous()
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(grad.double(), rgrad.double(), rtol=rtol, atol=atol, equal_nan=True)
    else:
        assert grad.numel() == 0
    return loss, lse, grad


# ---------------------------------------------------------------------------------------------
# Every launch path x dtype, class targets and soft targets.

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASSES)
def test_paths_class_target(c, dtype):
    gen = torch.Generator().manual_seed(c)
    m = 7 if c > 10000 else 37
    logits, target, _ = make_inputs(m, c, dtype, gen, ignore_index=-100)
    for reduction in (0, 1, 2):
        check_against_reference(logits, target, None, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [5, 700, 70001])
def test_paths_soft_target(c, dtype):
    gen = torch.Generator().manual_seed(100 + c)
    logits, target, w = make_inputs(5, c, dtype, gen, soft=True, weight=True)
    for reduction in (0, 1, 2):
        check_against_reference(logits, target, None, reduction)
        check_against_reference(logits, target, w, reduction, label_smoothing=0.1)


OPTIONS = {
    "weight": dict(weight=True),
    "ignore": dict(ignore_index=2),
    "smooth": dict(label_smoothing=0.25),
    "weight+smooth": dict(weight=True, label_smoothing=0.3),
    "weight+smooth+ignore": dict(weight=True, label_smoothing=0.1, ignore_index=0),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=5.0),
    "all": dict(weight=True, label_smoothing=0.2, ignore_index=1, z_loss=2e-4, softcap=8.0),
    "soft+smooth+z_loss+softcap": dict(soft=True, label_smoothing=0.2, z_loss=1e-3, softcap=6.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("c", [33, 2051, 40000])
def test_options(c, option, dtype):
    opts = dict(OPTIONS[option])
    gen = torch.Generator().manual_seed(7 * c + len(option))
    soft = opts.pop("soft", False)
    logits, target, w = make_inputs(9, c, dtype, gen, soft=soft, weight=opts.pop("weight", False),
                                    ignore_index=opts.get("ignore_index"))
    for reduction in (0, 1, 2):
        check_against_reference(logits, target, w, reduction, opts.get("ignore_index", -100),
                                opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0), opts.get("softcap", 0.0))
    check_against_reference(logits, target, w, 1, opts.get("ignore_index", -100), opts.get("label_smoothing", 0.0),
                            opts.get("z_loss", 0.0), opts.get("softcap", 0.0), compute_grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("c", [13, 1001, 33333])
@pytest.mark.parametrize("shift", [1, 3])
def test_misaligned_storage(c, shift, dtype):
    """Logits, target and weight that start off a 16-byte boundary (a view with a storage offset):
    the kernel falls back to element-wise access where the alignments of its tensors differ."""
    gen = torch.Generator().manual_seed(c + shift)
    m = 6
    base, _, _ = make_inputs(m * c + shift, 1, dtype, gen)
    logits = base.view(-1)[shift:].view(m, c)
    assert logits.is_contiguous() and logits.storage_offset() == shift
    soft_base = torch.rand(m * c + 2 * shift, generator=gen, dtype=torch.float64).to(dtype).cuda()
    soft = soft_base[2 * shift:].view(m, c)
    w = (torch.rand(c + shift, generator=gen, dtype=torch.float64) + 0.5).to(dtype).cuda()[shift:]
    target = torch.randint(0, c, (m,), generator=gen).cuda()
    for reduction in (0, 1):
        check_against_reference(logits, target, w, reduction, label_smoothing=0.1)
        check_against_reference(logits, soft, w, reduction)


@pytest.mark.parametrize("knobs", [{"TORCH_XENT_CUDA_CACHE": "0"}, {"TORCH_XENT_CUDA_MAX_CLUSTER": "1"},
                                   {"TORCH_XENT_CUDA_CHUNK_KB": "4"}], ids=lambda k: ",".join(k))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fallback_paths(knobs, dtype, monkeypatch):
    """The paths that large rows take: the gradient pass re-reading the logits (rows too large for
    shared memory), one block per large row (no clusters: pre-Hopper GPUs), and the largest clusters."""
    for key, value in knobs.items():
        monkeypatch.setenv(key, value)
    gen = torch.Generator().manual_seed(11)
    for c, opts in ((70001, dict(weight=True, ignore_index=-100)), (20000, dict(soft=True, weight=True))):
        logits, target, w = make_inputs(5, c, dtype, gen, soft=opts.get("soft", False), weight=True,
                                        ignore_index=opts.get("ignore_index"))
        for reduction in (0, 1):
            check_against_reference(logits, target, w, reduction, label_smoothing=0.1, z_loss=1e-4, softcap=20.0)
        buf = logits.clone()
        OPS.cross_entropy_forward_inplace(buf, target, w, 1, -100, 0.1, 0.0, 0.0)
        _, _, grad = OPS.cross_entropy_forward(logits, target, w, 1, -100, 0.1, 0.0, 0.0, True)
        assert torch.equal(buf, grad)


def test_empty_batch():
    logits = torch.randn(0, 10, device="cuda")
    target = torch.zeros(0, dtype=torch.long, device="cuda")
    for reduction, expect in ((0, None), (1, float("nan")), (2, 0.0)):
        loss, lse, grad = OPS.cross_entropy_forward(logits, target, None, reduction, -100, 0.0, 0.0, 0.0, True)
        assert grad.shape == (0, 10) and lse.shape == (0,)
        if expect is None:
            assert loss.shape == (0,)
        else:
            torch.testing.assert_close(loss.cpu(), torch.tensor(expect), equal_nan=True)


# ---------------------------------------------------------------------------------------------
# In place, values at the edges, and what the user sees for an out-of-range target.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [100, 5000, 70001])
def test_inplace_matches_out_of_place(c, dtype):
    gen = torch.Generator().manual_seed(c)
    logits, target, w = make_inputs(11, c, dtype, gen, weight=True, ignore_index=-100)
    loss, lse, grad = OPS.cross_entropy_forward(logits, target, w, 1, -100, 0.1, 1e-4, 0.0, True)
    buf = logits.clone()
    loss2, lse2 = OPS.cross_entropy_forward_inplace(buf, target, w, 1, -100, 0.1, 1e-4, 0.0)
    assert torch.equal(loss, loss2) and torch.equal(lse, lse2)
    assert torch.equal(buf, grad)


@pytest.mark.parametrize("c", [7, 3000, 70001])
def test_nan_and_inf_rows(c):
    gen = torch.Generator().manual_seed(c)
    logits, target, _ = make_inputs(6, c, torch.float32, gen)
    target[5] = -100
    logits[0, c // 2] = float("nan")       # NaN: that row only
    logits[1, (target[1] + 1) % c] = float("inf")  # +inf: NaN row
    logits[2, (target[2] + 1) % c] = float("-inf")  # -inf elsewhere: finite, gradient 0 there
    logits[3, target[3]] = float("-inf")   # -inf at the target: infinite loss
    logits[5] = float("nan")               # ignored row: 0 loss, 0 gradient, never read
    loss, lse, grad = OPS.cross_entropy_forward(logits, target, None, 0, -100, 0.0, 0.0, 0.0, True)
    loss, grad = loss.cpu(), grad.cpu()
    assert loss[0].isnan() and grad[0].isnan().all()
    assert loss[1].isnan()
    assert loss[2].isfinite() and grad[2, (target[2] + 1) % c] == 0 and grad[2].isfinite().all()
    assert loss[3] == float("inf")
    assert loss[4].isfinite() and grad[4].isfinite().all()
    assert loss[5] == 0 and lse[5] == 0 and (grad[5] == 0).all()
    check_against_reference(logits[2:3].contiguous(), target[2:3], None, 0)


@pytest.mark.parametrize("c", [9, 3000, 70001])
@pytest.mark.parametrize("bad", [-3, 10**6])
def test_out_of_range_target_poisons_its_row(c, bad):
    """The kernel cannot raise without synchronising: an out-of-range class index gives a NaN loss,
    lse and gradient row for that row alone; other rows are exact, and a reduced loss is NaN."""
    gen = torch.Generator().manual_seed(c)
    logits, target, w = make_inputs(5, c, torch.float32, gen, weight=True)
    target[2] = bad if bad < 0 else c + bad
    loss, lse, grad = OPS.cross_entropy_forward(logits, target, w, 0, -100, 0.1, 0.0, 0.0, True)
    assert loss[2].isnan() and lse[2].isnan() and grad[2].isnan().all()
    good = [0, 1, 3, 4]
    rloss, rlse, rgrad = reference.cross_entropy_forward(logits[good], target[good], w, 0, -100, 0.1)
    torch.testing.assert_close(loss[good], rloss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad[good], rgrad, rtol=2e-5, atol=1e-8)
    for reduction in (1, 2):
        loss, _, grad = OPS.cross_entropy_forward(logits, target, w, reduction, -100, 0.1, 0.0, 0.0, True)
        assert loss.isnan()
        assert grad[2].isnan().all() and grad[good].isfinite().all()
    # The mean leaves the bad row out of its denominator, like an ignored row.
    ignored = target.clone()
    ignored[2] = -100
    _, _, rgrad = reference.cross_entropy_forward(logits, ignored, w, 1, -100, 0.1)
    _, _, grad = OPS.cross_entropy_forward(logits, target, w, 1, -100, 0.1, 0.0, 0.0, True)
    torch.testing.assert_close(grad[good], rgrad[good], rtol=2e-5, atol=1e-8)
    # Through the public function: the loss is NaN (no exception, no device-side assert).
    x = logits.clone().requires_grad_(True)
    out = torch_xent.cross_entropy(x, target, impl="native")
    assert out.isnan()
    out.backward()
    assert x.grad[2].isnan().all() and x.grad[good].isfinite().all()


# ---------------------------------------------------------------------------------------------
# Determinism, streams, synchronisation, large offsets.

@pytest.mark.parametrize("c", [50, 8192, 131072])
def test_deterministic(c):
    gen = torch.Generator().manual_seed(c)
    logits, target, w = make_inputs(64, c, torch.float32, gen, weight=True, ignore_index=-100)
    first = OPS.cross_entropy_forward(logits, target, w, 1, -100, 0.1, 1e-4, 0.0, True)
    for _ in range(3):
        again = OPS.cross_entropy_forward(logits, target, w, 1, -100, 0.1, 1e-4, 0.0, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_no_host_synchronisation():
    gen = torch.Generator().manual_seed(0)
    for c in (10, 5000, 70001):
        logits, target, w = make_inputs(8, c, torch.bfloat16, gen, weight=True, ignore_index=-100)
        OPS.cross_entropy_forward(logits, target, w, 1, -100, 0.1, 0.0, 0.0, True)  # first call: set-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for reduction in (0, 1, 2):
                OPS.cross_entropy_forward(logits, target, w, reduction, -100, 0.1, 0.0, 0.0, True)
            OPS.cross_entropy_forward_inplace(logits.clone(), target, w, 1, -100, 0.1, 0.0, 0.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_runs_on_the_current_stream():
    gen = torch.Generator().manual_seed(1)
    logits, target, _ = make_inputs(512, 30000, torch.float32, gen)
    expect = OPS.cross_entropy_forward(logits, target, None, 1, -100, 0.0, 0.0, 0.0, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # A long kernel queued first on the side stream: a launch on another stream would race it.
        scaled = logits * 1.0
        got = OPS.cross_entropy_forward(scaled, target, None, 1, -100, 0.0, 0.0, 0.0, True)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(expect, got):
        assert torch.equal(a, b)


def test_second_device_guard():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    logits = torch.randn(4, 100, device="cuda:1")
    target = torch.randint(0, 100, (4,), device="cuda:1")
    check_against_reference(logits, target, None, 1)


def test_rows_past_2_31_elements():
    """Rows whose offset row * C exceeds 2**31 elements (64-bit offsets)."""
    c = 65536
    m = (2**31) // c + 3
    need = 2 * m * c * 2 + (1 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(m, c, device="cuda", dtype=torch.bfloat16, generator=gen)
    target = torch.randint(0, c, (m,), device="cuda", generator=gen)
    loss, lse, grad = OPS.cross_entropy_forward(logits, target, None, 0, -100, 0.0, 0.0, 0.0, True)
    tail = slice(m - 4, m)
    rloss, rlse, rgrad = reference.cross_entropy_forward(logits[tail], target[tail], None, 0)
    torch.testing.assert_close(loss[tail], rloss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[tail].double(), rgrad.double(), rtol=1.6e-2, atol=1e-6)
    del logits, grad


# ---------------------------------------------------------------------------------------------
# The in-place gradient scale used by the backward (when the op is declared).

@pytest.mark.skipif(not hasattr(torch.ops.torch_xent, "cross_entropy_scale_grad_"),
                    reason="cross_entropy_scale_grad_ is not declared in this build")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 4099, 1 << 20])
def test_scale_grad(n, dtype):
    gen = torch.Generator().manual_seed(n)
    base = torch.randn(n + 1, generator=gen, dtype=torch.float64).to(dtype).cuda()
    for grad in (base[:n], base[1:]):  # aligned and misaligned
        for factor in (1.0, 0.5, -3.0):
            g = grad.clone()
            OPS.cross_entropy_scale_grad_(g, torch.tensor(factor, dtype=dtype, device="cuda"))
            expect = (grad.double() * factor).to(dtype)
            torch.testing.assert_close(g, expect, rtol=0, atol=0)
