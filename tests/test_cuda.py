"""CUDA-kernel specific tests.

On a GPU: every launch configuration (several rows per block, a block per row, a cluster of blocks
per row), misaligned rows, out-of-range targets, determinism, streams, no host synchronisation, rows
past 2**31 elements; compared with torch_xent.reference (the oracle). Skipped without a GPU.

Anywhere a C++ compiler and the CUDA headers are found (no GPU needed): the kernels' per-row code
(csrc/cuda/xent_rows.cuh) run on the CPU thread by thread by csrc/cuda/emulate_rows.cpp, over the
same launch configurations, against the reference.
"""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import torch_xent
from helpers import DTYPES, assert_close, assert_matches_reference, make_problem, op_args
from torch_xent import LossOptions, reference

needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch_xent.native_available("cuda")),
    reason="needs a GPU and the compiled CUDA kernel")

OPS = torch.ops.torch_xent
# Class counts that reach each launch path for 4-byte logits: one group of threads per row
# (<= 128 16-byte slots), one block per row with the row in shared memory, and rows too large for
# shared memory (read twice). Odd counts misalign every other row; tiny ones leave most lanes idle.
CLASSES = [1, 3, 10, 127, 509, 1000, 4096, 16385, 20000, 70001, 131072 + 3]


def check_against_reference(logits, target, weight, reduction, ignore_index=-100, label_smoothing=0.0,
                            z_loss=0.0, softcap=0.0, compute_grad=True):
    out = OPS.cross_entropy_forward(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
                                    compute_grad)
    opts = LossOptions(("none", "mean", "sum")[reduction], ignore_index, label_smoothing, z_loss, softcap or None)
    assert_matches_reference(out, logits, target, weight, opts, compute_grad)
    return out


# ---------------------------------------------------------------------------------------------
# Every launch path x dtype, class targets and soft targets.

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASSES)
def test_paths_class_target(c, dtype):
    gen = torch.Generator().manual_seed(c)
    m = 7 if c > 10000 else 37
    logits, target, _ = make_problem((m, c), dtype, "cuda", dict(ignore_index=-100, scale=4.0), gen)
    for reduction in (0, 1, 2):
        check_against_reference(logits, target, None, reduction)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [5, 700, 70001])
def test_paths_soft_target(c, dtype):
    gen = torch.Generator().manual_seed(100 + c)
    logits, target, w = make_problem((5, c), dtype, "cuda", dict(soft=True, weight=True, scale=4.0), gen)
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


def _assert_edge_rows(loss, lse, grad, target, c):
    """Rows 0-5 as the edge-value tests build them: a NaN logit, +inf off the target, -inf off the target,
    -inf at the target, an ordinary row, an ignored row of NaN."""
    assert loss[0].isnan() and grad[0].isnan().all()
    assert loss[1].isnan()
    assert loss[2].isfinite() and grad[2, (target[2] + 1) % c] == 0 and grad[2].isfinite().all()
    assert loss[3] == float("inf")
    assert loss[4].isfinite() and grad[4].isfinite().all()
    assert loss[5] == 0 and lse[5] == 0 and (grad[5] == 0).all()


def _option_problem(option, shape, dtype, device, seed):
    """(logits, target, weight, op arguments (ignore_index, label_smoothing, z_loss, softcap)) for OPTIONS[option]."""
    opts = OPTIONS[option]
    logits, target, w = make_problem(shape, dtype, device, dict(opts, scale=4.0), seed)
    return logits, target, w, op_args(opts)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("c", [33, 2051, 40000])
def test_options(c, option, dtype):
    logits, target, w, args = _option_problem(option, (9, c), dtype, "cuda", 7 * c + len(option))
    for reduction in (0, 1, 2):
        check_against_reference(logits, target, w, reduction, *args)
    check_against_reference(logits, target, w, 1, *args, compute_grad=False)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("c", [13, 1001, 33333])
@pytest.mark.parametrize("shift", [1, 3])
def test_misaligned_storage(c, shift, dtype):
    """Logits, target and weight that start off a 16-byte boundary (a view with a storage offset):
    the kernel falls back to element-wise access where the alignments of its tensors differ."""
    gen = torch.Generator().manual_seed(c + shift)
    m = 6
    base, _, _ = make_problem((m * c + shift, 1), dtype, "cuda", dict(scale=4.0), gen)
    logits = base.view(-1)[shift:].view(m, c)
    assert logits.is_contiguous() and logits.storage_offset() == shift
    soft_base = torch.rand(m * c + 2 * shift, generator=gen, dtype=torch.float64).to(dtype).cuda()
    soft = soft_base[2 * shift:].view(m, c)
    w = (torch.rand(c + shift, generator=gen, dtype=torch.float64) + 0.5).to(dtype).cuda()[shift:]
    target = torch.randint(0, c, (m,), generator=gen).cuda()
    for reduction in (0, 1):
        check_against_reference(logits, target, w, reduction, label_smoothing=0.1)
        check_against_reference(logits, soft, w, reduction)


@needs_gpu
@pytest.mark.parametrize("knobs", [{}, {"TORCH_XENT_CUDA_CACHE": "0"}, {"TORCH_XENT_CUDA_MAX_CLUSTER": "8"},
                                   {"TORCH_XENT_CUDA_MAX_CLUSTER": "8", "TORCH_XENT_CUDA_CHUNK_KB": "4"}],
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fallback_paths(knobs, dtype, monkeypatch):
    """The paths that large rows take: one block per row (the default), the gradient pass re-reading
    the logits (rows too large for shared memory), and the opt-in clusters of 5 and 8 blocks a row
    (sm_90 only; elsewhere the knob is ignored and the default path runs)."""
    for key, value in knobs.items():
        monkeypatch.setenv(key, value)
    gen = torch.Generator().manual_seed(11)
    for c, opts in ((70001, dict(weight=True, ignore_index=-100)), (20000, dict(soft=True, weight=True))):
        logits, target, w = make_problem((5, c), dtype, "cuda", dict(soft=opts.get("soft", False), weight=True,
                                         ignore_index=opts.get("ignore_index"), scale=4.0), gen)
        for reduction in (0, 1):
            check_against_reference(logits, target, w, reduction, label_smoothing=0.1, z_loss=1e-4, softcap=20.0)
        buf = logits.clone()
        OPS.cross_entropy_forward_inplace(buf, target, w, 1, -100, 0.1, 0.0, 0.0)
        _, _, grad = OPS.cross_entropy_forward(logits, target, w, 1, -100, 0.1, 0.0, 0.0, True)
        assert torch.equal(buf, grad)


@needs_gpu
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

@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [100, 5000, 70001])
def test_inplace_matches_out_of_place(c, dtype):
    gen = torch.Generator().manual_seed(c)
    logits, target, w = make_problem((11, c), dtype, "cuda", dict(weight=True, ignore_index=-100, scale=4.0), gen)
    loss, lse, grad = OPS.cross_entropy_forward(logits, target, w, 1, -100, 0.1, 1e-4, 0.0, True)
    buf = logits.clone()
    loss2, lse2 = OPS.cross_entropy_forward_inplace(buf, target, w, 1, -100, 0.1, 1e-4, 0.0)
    assert torch.equal(loss, loss2) and torch.equal(lse, lse2)
    assert torch.equal(buf, grad)


@needs_gpu
@pytest.mark.parametrize("c", [7, 3000, 70001])
def test_nan_and_inf_rows(c):
    gen = torch.Generator().manual_seed(c)
    logits, target, _ = make_problem((6, c), torch.float32, "cuda", dict(scale=4.0), gen)
    target[5] = -100
    logits[0, c // 2] = float("nan")       # NaN: that row only
    logits[1, (target[1] + 1) % c] = float("inf")  # +inf: NaN row
    logits[2, (target[2] + 1) % c] = float("-inf")  # -inf elsewhere: finite, gradient 0 there
    logits[3, target[3]] = float("-inf")   # -inf at the target: infinite loss
    logits[5] = float("nan")               # ignored row: 0 loss, 0 gradient, never read
    loss, lse, grad = OPS.cross_entropy_forward(logits, target, None, 0, -100, 0.0, 0.0, 0.0, True)
    _assert_edge_rows(loss.cpu(), lse.cpu(), grad.cpu(), target.cpu(), c)
    check_against_reference(logits[2:3].contiguous(), target[2:3], None, 0)


@needs_gpu
@pytest.mark.parametrize("c", [9, 3000, 70001])
@pytest.mark.parametrize("bad", [-3, 10**6])
def test_out_of_range_target_poisons_its_row(c, bad):
    """The kernel cannot raise without synchronising: an out-of-range class index gives a NaN loss,
    lse and gradient row for that row alone; other rows are exact, and a reduced loss is NaN."""
    gen = torch.Generator().manual_seed(c)
    logits, target, w = make_problem((5, c), torch.float32, "cuda", dict(weight=True, scale=4.0), gen)
    target[2] = bad if bad < 0 else c + bad
    loss, lse, grad = OPS.cross_entropy_forward(logits, target, w, 0, -100, 0.1, 0.0, 0.0, True)
    assert loss[2].isnan() and lse[2].isnan() and grad[2].isnan().all()
    good = [0, 1, 3, 4]
    rloss, rlse, rgrad = reference.cross_entropy_forward(logits[good], target[good], w, LossOptions("none", -100, 0.1))
    torch.testing.assert_close(loss[good], rloss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad[good], rgrad, rtol=2e-5, atol=1e-8)
    for reduction in (1, 2):
        loss, _, grad = OPS.cross_entropy_forward(logits, target, w, reduction, -100, 0.1, 0.0, 0.0, True)
        assert loss.isnan()
        assert grad[2].isnan().all() and grad[good].isfinite().all()
    # The mean leaves the bad row out of its denominator, like an ignored row.
    ignored = target.clone()
    ignored[2] = -100
    _, _, rgrad = reference.cross_entropy_forward(logits, ignored, w, LossOptions("mean", -100, 0.1))
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

@needs_gpu
@pytest.mark.parametrize("c", [50, 8192, 131072])
def test_deterministic(c):
    gen = torch.Generator().manual_seed(c)
    logits, target, w = make_problem((64, c), torch.float32, "cuda", dict(weight=True, ignore_index=-100, scale=4.0),
                                     gen)
    first = OPS.cross_entropy_forward(logits, target, w, 1, -100, 0.1, 1e-4, 0.0, True)
    for _ in range(3):
        again = OPS.cross_entropy_forward(logits, target, w, 1, -100, 0.1, 1e-4, 0.0, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@needs_gpu
def test_no_host_synchronisation():
    gen = torch.Generator().manual_seed(0)
    for c in (10, 5000, 70001):
        logits, target, w = make_problem((8, c), torch.bfloat16, "cuda", dict(weight=True, ignore_index=-100,
                                         scale=4.0), gen)
        OPS.cross_entropy_forward(logits, target, w, 1, -100, 0.1, 0.0, 0.0, True)  # first call: set-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for reduction in (0, 1, 2):
                OPS.cross_entropy_forward(logits, target, w, reduction, -100, 0.1, 0.0, 0.0, True)
            OPS.cross_entropy_forward_inplace(logits.clone(), target, w, 1, -100, 0.1, 0.0, 0.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@needs_gpu
def test_runs_on_the_current_stream():
    gen = torch.Generator().manual_seed(1)
    logits, target, _ = make_problem((512, 30000), torch.float32, "cuda", dict(scale=4.0), gen)
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


@needs_gpu
def test_second_device_guard():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    logits = torch.randn(4, 100, device="cuda:1")
    target = torch.randint(0, 100, (4,), device="cuda:1")
    check_against_reference(logits, target, None, 1)


@needs_gpu
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
    rloss, rlse, rgrad = reference.cross_entropy_forward(logits[tail], target[tail], None, LossOptions("none"))
    torch.testing.assert_close(loss[tail], rloss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[tail].double(), rgrad.double(), rtol=1.6e-2, atol=1e-6)
    del logits, grad


# ---------------------------------------------------------------------------------------------
# Precision: the loss is computed relative to the row max (row_loss_shifted in csrc/xent_math.h).

@needs_gpu
@pytest.mark.parametrize("c", [10, 3001, 70001])
@pytest.mark.parametrize("soft", [False, True], ids=["class", "soft"])
def test_large_magnitude_logits(c, soft):
    """Logits of magnitude 1e4 in float32: the loss keeps its digits (relative to float64), also with
    label smoothing and soft targets, whose dot product is rebased as the running max grows."""
    gen = torch.Generator().manual_seed(c)
    logits, target, w = make_problem((6, c), torch.float32, "cuda", dict(soft=soft, weight=True, scale=1e4), gen)
    for smoothing in (0.0, 0.1):
        loss, lse, grad = OPS.cross_entropy_forward(logits, target, w, 0, -100, smoothing, 0.0, 0.0, True)
        rloss, rlse, rgrad = reference.cross_entropy_forward(logits.double(), target.double() if soft else target,
                                                             w.double(), LossOptions("none", -100, smoothing))
        torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(lse.double(), rlse, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-6)


@needs_gpu
def test_rows_of_minus_inf_and_one_finite_logit():
    """A row whose logits are -inf but one: loss 0 for that class, gradient exactly 0 elsewhere."""
    c = 5000
    logits = torch.full((3, c), float("-inf"), device="cuda")
    target = torch.tensor([0, c - 1, 17], device="cuda")
    logits[0, 0] = 3.0
    logits[1, c - 1] = -2.5e4
    logits[2, 17] = 1e4
    loss, lse, grad = OPS.cross_entropy_forward(logits, target, None, 0, -100, 0.0, 0.0, 0.0, True)
    assert torch.equal(loss.cpu(), torch.zeros(3))
    torch.testing.assert_close(lse.cpu(), torch.tensor([3.0, -2.5e4, 1e4]), rtol=0, atol=0)
    assert torch.equal(grad.cpu(), torch.zeros(3, c))


# ---------------------------------------------------------------------------------------------
# No GPU needed: the kernels' per-row code, compiled for the CPU (csrc/cuda/emulate_rows.cpp) and
# run one GPU thread after another over the kernels' launch configurations.

ROOT = Path(__file__).resolve().parent.parent
EMULATOR_SOURCE = ROOT / "csrc" / "cuda" / "emulate_rows.cpp"
EMU_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
MODES = {"hard": 0, "hard_weighted": 1, "soft": 2}


def _cuda_include_dir():
    """The CUDA toolkit's include folder (for cuda_fp16.h / cuda_bf16.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        try:  # nvcc may be a wrapper script outside the toolkit: ask it where it lives
            out = subprocess.run([nvcc, "-v", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60).stderr
            candidates += [str(Path(line.split("=", 1)[1].strip()).parent) for line in out.splitlines()
                           if line.startswith("#$ _HERE_=")]
        except (OSError, subprocess.SubprocessError):
            pass
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return Path(home) / "include"
    return None


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    include = _cuda_include_dir()
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if include is None or cxx is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (CUDA_HOME) to build the row emulator")
    lib = tmp_path_factory.mktemp("emulator") / "libxent_emulate_rows.so"
    cmd = [cxx, "-O1", "-std=c++17", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'cuda'}",
           f"-I{include}", str(EMULATOR_SOURCE), "-o", str(lib)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"building the emulator failed:\n{' '.join(cmd)}\n{result.stderr[-4000:]}"
    fn = ctypes.CDLL(str(lib)).xent_emulate_rows
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 7 + [
        ctypes.c_double, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_double, ctypes.c_double,
        ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    return fn


def kernel_config(c, dtype, has_grad, cluster_max=1, chunk_bytes=64 * 1024, smem_bytes=227 * 1024):
    """The launch configuration launch_rows (csrc/cuda/xent_kernel.cu) picks: (threads a row, blocks a
    row, 16-byte slots a block, cache the row in shared memory)."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    row_slots = -(-(c + vec - 1) // vec)
    if row_slots <= 128:
        tpr = 1
        while tpr < -(-row_slots // 4):
            tpr *= 2
        return min(32, tpr), 1, row_slots, has_grad
    cluster = 1
    if has_grad and row_slots * 16 > chunk_bytes:
        cluster = min(cluster_max, -(-(row_slots * 16) // chunk_bytes))
    chunk = -(-row_slots // cluster)
    threads = 1
    while threads * 2 <= chunk // 8:
        threads *= 2
    return max(64, min(256, threads)), cluster, chunk, has_grad and chunk * 16 <= smem_bytes - 2048


def emulate(fn, logits, target, weight, reduction, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=0.0,
            compute_grad=True, config=None, inplace=False):
    """What the CUDA op returns, computed by the emulator: (loss, lse, grad)."""
    m, c = logits.shape
    soft = target.is_floating_point()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if soft:
        mode = MODES["soft"]
    else:
        mode = MODES["hard_weighted" if weight is not None and label_smoothing > 0 else "hard"]
    threads, cluster, chunk, cache = config or kernel_config(c, logits.dtype, compute_grad)
    if reduction == 1:  # as xent_mean_scale_kernel: out-of-range rows are left out of the denominator
        if soft:
            scale = 1.0 / m if m else float("nan")
        else:
            ok = (target != ignore_index) & (target >= 0) & (target < c)
            w = weight.to(acc)[target[ok]] if weight is not None else torch.ones(int(ok.sum()), dtype=acc)
            denom = float(w.sum(dtype=acc))
            scale = 1.0 / denom if denom else float("inf")
    else:
        scale = 1.0
    row_loss = torch.full((m,), 123.0, dtype=acc)  # poison: every row must be written
    lse = torch.full((m,), 123.0, dtype=acc)
    if inplace:
        grad = logits
    elif compute_grad:
        grad = torch.full_like(logits, 77.0)
    else:
        grad = None
    rc = fn(EMU_DTYPES[logits.dtype], mode, logits.data_ptr(), grad.data_ptr() if grad is not None else None,
            None if soft else target.data_ptr(), target.data_ptr() if soft else None,
            weight.data_ptr() if weight is not None else None, row_loss.data_ptr(), lse.data_ptr(), scale, m, c,
            ignore_index, label_smoothing, z_loss, softcap, threads, cluster, chunk, int(cache), 0)
    assert rc == 0, "the lanes of a warp disagreed after the butterfly reduction" if rc == 1 else f"rc {rc}"
    if reduction == 0:
        loss = row_loss
    else:
        loss = (row_loss.sum(dtype=acc) * (scale if reduction == 1 else 1.0)).to(acc)
    return loss, lse, grad if grad is not None else logits.new_empty(0)


def check_emulated(fn, logits, target, weight, reduction, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                   softcap=0.0, compute_grad=True, config=None):
    out = emulate(fn, logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
                  compute_grad, config)
    opts = LossOptions(("none", "mean", "sum")[reduction], ignore_index, label_smoothing, z_loss, softcap or None)
    assert_matches_reference(out, logits, target, weight, opts, compute_grad)
    return out


# Every launch path of 4-byte logits (group of 1..32 threads a row, a block a row with the row in
# shared memory, rows too large for it) and, through `cluster_max`, the clusters of the sm_90 path.
EMU_CLASSES = [1, 3, 10, 127, 509, 1000, 4096, 16385, 70001]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", EMU_CLASSES)
def test_emulated_paths(emulator, c, dtype):
    gen = torch.Generator().manual_seed(c)
    m = 3 if c > 10000 else 9
    logits, target, w = make_problem((m, c), dtype, "cpu", dict(weight=True, ignore_index=-100, scale=4.0), gen)
    for reduction in (0, 1, 2):
        check_emulated(emulator, logits, target, None, reduction)
    check_emulated(emulator, logits, target, w, 1, label_smoothing=0.1, z_loss=1e-4)
    check_emulated(emulator, logits, target, w, 1, compute_grad=False)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [33, 2051, 20000])
def test_emulated_options(emulator, c, dtype, option):
    logits, target, w, args = _option_problem(option, (5, c), dtype, "cpu", 3 * c + len(option))
    for reduction in (0, 1, 2):
        check_emulated(emulator, logits, target, w, reduction, *args)


# (threads a row, blocks a row): odd thread counts of the block kernel's range, one thread for a
# whole row, and clusters of 2..8 blocks (the opt-in sm_90 path), with and without the row cached.
EMU_CONFIGS = [(64, 1), (256, 1), (1, 1), (32, 1), (128, 2), (64, 3), (256, 5), (64, 8)]


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "reread"])
@pytest.mark.parametrize("threads,cluster", EMU_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_emulated_configs(emulator, shift, dtype, threads, cluster, cache):
    """Any split of a row over threads and cluster blocks gives the same answer, for misaligned
    tensors (shift) too, and the in-place form writes the same gradient."""
    gen = torch.Generator().manual_seed(shift * 100 + threads + cluster)
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    for c, soft in ((3001, False), (2000, True), (61, False)):
        logits, target, w = make_problem((4, c), dtype, "cpu", dict(soft=soft, weight=True,
                                         ignore_index=None if soft else 5, shift=shift, scale=4.0), gen)
        config = (threads, cluster, -(-(-(-(c + vec - 1) // vec)) // cluster), cache)
        for reduction in (0, 1):
            check_emulated(emulator, logits, target, w, reduction, 5 if not soft else -100, 0.2, 1e-4, 7.0,
                           config=config)
        _, _, grad = emulate(emulator, logits, target, w, 1, -100, 0.1, config=config)
        # Same misalignment as the logits (an aligned copy would split the row differently and
        # round differently in the last bit).
        buf = torch.empty(logits.numel() + shift, dtype=dtype)[shift:].view_as(logits).copy_(logits)
        emulate(emulator, buf, target, w, 1, -100, 0.1, config=config, inplace=True)
        assert torch.equal(buf, grad)


def test_emulated_edge_values(emulator):
    c = 5000
    gen = torch.Generator().manual_seed(5)
    logits, target, _ = make_problem((7, c), torch.float32, "cpu", dict(scale=4.0), gen)
    target[5] = -100
    target[6] = c + 3  # out of range: a NaN row, never read
    logits[0, c // 2] = float("nan")
    logits[1, (target[1] + 1) % c] = float("inf")
    logits[2, (target[2] + 1) % c] = float("-inf")
    logits[3, target[3]] = float("-inf")
    logits[5] = float("nan")
    for config in (None, (64, 4, -(-1250 // 4), True)):
        loss, lse, grad = emulate(emulator, logits, target, None, 0, config=config)
        _assert_edge_rows(loss, lse, grad, target, c)
        assert loss[6].isnan() and lse[6].isnan() and grad[6].isnan().all()
    # Large magnitudes keep their digits (the loss is computed relative to the row max).
    big, target, w = make_problem((4, 3001), torch.float32, "cpu", dict(weight=True, scale=1e4), gen)
    for smoothing in (0.0, 0.1):
        for config in (None, (64, 3, -(-751 // 3), True)):
            loss, lse, grad = emulate(emulator, big, target, w, 0, -100, smoothing, config=config)
            rloss, rlse, rgrad = reference.cross_entropy_forward(big.double(), target, w.double(),
                                                                 LossOptions("none", -100, smoothing))
            torch.testing.assert_close(loss.double(), rloss, rtol=1e-5, atol=1e-3)
            torch.testing.assert_close(grad.double(), rgrad, rtol=1e-4, atol=1e-6)


def test_emulated_production_configs_cover_every_path():
    """The configurations the emulated tests reach are the ones launch_rows picks (guards this
    file's copy of the heuristic against drifting into testing nothing)."""
    seen = {kernel_config(c, torch.float32, True)[:2] for c in EMU_CLASSES}
    assert {(1, 1), (32, 1), (256, 1)} <= seen
    assert not kernel_config(70001, torch.float32, True)[3]  # too large for shared memory: re-read
    assert kernel_config(16385, torch.float32, True)[3]
    # 131072 classes span up to 32769 slots (a misaligned row): 8 blocks of 4097.
    assert kernel_config(131072, torch.float32, True, cluster_max=8)[1:3] == (8, 4097)


# ---------------------------------------------------------------------------------------------
# K-dimensional input in its own layout, (N, C, S) logits: the CUDA kernel's per-position code
# (csrc/cuda/xent_positions.cuh), run thread by thread by the emulator.


def emulate_positions(fn, logits, target, weight, reduction, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                      softcap=0.0, compute_grad=True, inplace=False, need_lse=True):
    """What the CUDA op returns for (N, C, S) logits, computed by the emulator: (loss, lse, grad)."""
    n, c, s = logits.shape
    m = n * s
    soft = target.is_floating_point()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    mode = MODES["soft" if soft else "hard_weighted" if weight is not None and label_smoothing > 0 else "hard"]
    if reduction == 1:  # as xent_mean_scale_kernel over the (N, S) targets
        if soft:
            scale = 1.0 / m if m else float("nan")
        else:
            flat = target.reshape(-1)
            ok = (flat != ignore_index) & (flat >= 0) & (flat < c)
            w = weight.to(acc)[flat[ok]] if weight is not None else torch.ones(int(ok.sum()), dtype=acc)
            denom = float(w.sum(dtype=acc))
            scale = 1.0 / denom if denom else float("inf")
    else:
        scale = 1.0
    row_loss = torch.full((n, s), 123.0, dtype=acc)  # poison: every position must be written
    lse = torch.full((n, s), 123.0, dtype=acc) if need_lse else None
    grad = logits if inplace else torch.full_like(logits, 77.0) if compute_grad else None
    rc = fn(EMU_DTYPES[logits.dtype], mode, logits.data_ptr(), grad.data_ptr() if grad is not None else None,
            None if soft else target.data_ptr(), target.data_ptr() if soft else None,
            weight.data_ptr() if weight is not None else None, row_loss.data_ptr(),
            lse.data_ptr() if lse is not None else None, scale, m, c, ignore_index, label_smoothing, z_loss, softcap,
            1, 1, 0, 0, s)
    assert rc == 0, f"rc {rc}"
    loss = row_loss if reduction == 0 else (row_loss.sum(dtype=acc) * (scale if reduction == 1 else 1.0)).to(acc)
    return loss, lse, grad if grad is not None else logits.new_empty(0)


def check_emulated_positions(fn, logits, target, weight, reduction, ignore_index=-100, label_smoothing=0.0,
                             z_loss=0.0, softcap=0.0):
    """The emulated (N, C, S) op against the reference on the same problem as rows, in place too."""
    n, c, s = logits.shape
    loss, lse, grad = emulate_positions(fn, logits, target, weight, reduction, ignore_index, label_smoothing,
                                        z_loss, softcap)
    rows = logits.movedim(1, -1).reshape(-1, c)
    tgt = target.movedim(1, -1).reshape(-1, c) if target.is_floating_point() else target.reshape(-1)
    rows_out = (loss.reshape(-1) if reduction == 0 else loss, lse.reshape(-1),
                grad.movedim(1, -1).reshape(-1, c).contiguous())
    opts = LossOptions(("none", "mean", "sum")[reduction], ignore_index, label_smoothing, z_loss, softcap or None)
    assert_matches_reference(rows_out, rows, tgt, weight, opts, True, what=f"positions {tuple(logits.shape)}")
    # Without the gradient and without the lse: the same loss; in place: the same gradient, bit for bit.
    lean = emulate_positions(fn, logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
                             compute_grad=False, need_lse=False)
    torch.testing.assert_close(lean[0], loss, equal_nan=True, rtol=0, atol=0)
    buf = logits.clone()
    emulate_positions(fn, buf, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, inplace=True)
    torch.testing.assert_close(buf, grad, equal_nan=True, rtol=0, atol=0)


# K = 1, 2, 3 flattened to S, odd sizes, a single position, few and many classes.
POSITION_SHAPES = [(2, 3, 1), (1, 5, 7), (3, 19, 64), (2, 7, 67), (2, 37, 130), (1, 150, 45), (2, 1000, 3), (1, 4, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", POSITION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_emulated_positions(emulator, shape, dtype, option):
    opts = OPTIONS[option]
    logits, target, w = make_problem(shape, dtype, "cpu", dict(opts, scale=4.0), 11 * shape[1] + len(option))
    for reduction in (0, 1, 2):
        check_emulated_positions(emulator, logits, target, w, reduction, *op_args(opts))


def test_emulated_positions_edge_values(emulator):
    """NaN and +-inf logits, an all -inf position, ignored positions holding NaN, every position of an
    item ignored, an out-of-range target (a NaN position, never read): as the row kernel's rows."""
    c, s = 6, 40
    logits, target, _ = make_problem((3, c, s), torch.float32, "cpu", dict(scale=4.0), 3)
    logits[0, 2, 0] = float("nan")                                 # position 0: a NaN logit
    logits[0, (int(target[0, 1]) + 1) % c, 1] = float("inf")       # position 1: +inf off the target
    logits[0, (int(target[0, 2]) + 1) % c, 2] = float("-inf")      # position 2: -inf off the target
    logits[0, int(target[0, 3]), 3] = float("-inf")                # position 3: -inf at the target
    target[0, 5] = -100
    logits[0, :, 5] = float("nan")                                 # position 5: ignored, all NaN
    target[0, 6] = c + 3                                           # position 6: out of range
    target[2] = -100                                               # item 2: nothing counts
    loss, lse, grad = emulate_positions(emulator, logits, target, None, 0)
    rows = grad[0].t()
    _assert_edge_rows(loss[0], lse[0], rows, target[0], c)
    assert loss[0, 6].isnan() and lse[0, 6].isnan() and rows[6].isnan().all()
    assert (loss[2] == 0).all() and (lse[2] == 0).all() and (grad[2] == 0).all()
    for reduction in (1, 2):  # the NaN positions make the reduced loss NaN, as PyTorch's would
        assert emulate_positions(emulator, logits, target, None, reduction)[0].isnan()
    # Large magnitudes keep their digits (the loss is computed relative to the position's max).
    big, target, w = make_problem((2, 301, 9), torch.float32, "cpu", dict(weight=True, scale=1e4), 4)
    for smoothing in (0.0, 0.1):
        loss, lse, grad = emulate_positions(emulator, big, target, w, 0, -100, smoothing)
        rows = big.movedim(1, -1).reshape(-1, 301).double()
        rloss, _, rgrad = reference.cross_entropy_forward(rows, target.reshape(-1), w.double(),
                                                          LossOptions("none", -100, smoothing))
        torch.testing.assert_close(loss.reshape(-1).double(), rloss, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(grad.movedim(1, -1).reshape(-1, 301).double(), rgrad, rtol=1e-4, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", [(2, 19, 33, 17), (1, 150, 64), (3, 5, 2, 3, 7), (1, 1000, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_positions_on_gpu(shape, option, dtype, monkeypatch):
    """K-dimensional input on the GPU through the position kernel: the op on the (N, C, S) view against
    the reference, the loss and gradient through torch_xent.cross_entropy against the reference
    implementation's, the gradient in the input's own layout (in place: in the logits' storage)."""
    from torch_xent import functional
    monkeypatch.setattr(functional, "CUDA_POSITIONS_MIN_POSITIONS", 1)  # these small problems too
    opts = OPTIONS[option]
    logits, target, w = make_problem(shape, dtype, "cuda", dict(opts, scale=4.0), len(option) + shape[1])
    n, c = shape[0], shape[1]
    view = logits.view(n, c, -1)
    tgt = target.view(n, c, -1) if target.is_floating_point() else target.view(n, -1)
    for reduction in (0, 1, 2):
        out = OPS.cross_entropy_forward(view, tgt, w, reduction, *op_args(opts), True)
        rows = view.movedim(1, -1).reshape(-1, c)
        rt = tgt.movedim(1, -1).reshape(-1, c) if tgt.is_floating_point() else tgt.reshape(-1)
        rows_out = (out[0].reshape(-1) if reduction == 0 else out[0], out[1].reshape(-1),
                    out[2].movedim(1, -1).reshape(-1, c).contiguous())
        ignore_index, smoothing, z_loss, cap = op_args(opts)
        o = LossOptions(("none", "mean", "sum")[reduction], ignore_index, smoothing, z_loss, cap or None)
        assert_matches_reference(rows_out, rows, rt, w, o, True, what=f"positions {shape}")
        buf = view.clone()
        ip_loss, _ = OPS.cross_entropy_forward_inplace(buf, tgt, w, reduction, *op_args(opts))
        torch.testing.assert_close(buf, out[2], equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(ip_loss, out[0], equal_nan=True, rtol=0, atol=0)
    x = logits.clone().requires_grad_()
    ignore_index, smoothing, z_loss, cap = op_args(opts)
    kw = dict(ignore_index=ignore_index, label_smoothing=smoothing, z_loss=z_loss, softcap=cap or None)
    loss = torch_xent.cross_entropy(x, target, weight=w, impl="native", **kw)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == x.shape and grad.is_contiguous()
    xr = logits.double().requires_grad_()
    ref = torch_xent.cross_entropy(xr, target, weight=None if w is None else w.double(), impl="reference", **kw)
    (rgrad,) = torch.autograd.grad(ref, xr)
    assert_close(loss, ref.to(dtype), dtype, "loss", "acc", num_classes=c)
    assert_close(grad, rgrad.to(dtype), dtype, "grad", "grad")
    x = logits.clone().requires_grad_()
    y = x * 1  # a non-leaf, so the in-place gradient may overwrite it
    loss = torch_xent.cross_entropy(y, target, weight=w, impl="native", inplace_backward=True, **kw)
    (g2,) = torch.autograd.grad(loss, y)
    assert g2.data_ptr() == y.data_ptr()


def test_cuda_reads_positions_only_where_they_fill_the_gpu():
    """Which K-dim inputs the CUDA kernel reads as positions (a thread each): few classes and many
    positions; the rest gets rows. Decided from the device and the shape alone (no GPU needed: a stand-in)."""
    from torch_xent import functional
    reads = functional._reads_positions

    class Cuda:  # a stand-in with a CUDA device: only the device and the shape are looked at
        def __init__(self, *shape):
            self.device, self.shape = torch.device("cuda"), shape

        def dim(self):
            return len(self.shape)

        def numel(self):
            n = 1
            for v in self.shape:
                n *= v
            return n

    assert reads("native", Cuda(8, 19, 512, 1024)) and reads("native", Cuda(4, 150, 256, 256))
    assert not reads("native", Cuda(8, 32000, 128))      # a long row a thread
    assert not reads("native", Cuda(2, 19, 64, 64))      # 8192 positions: 32 blocks
    assert not reads("native", Cuda(1000, 10))           # 2-D: rows
    assert not reads("reference", Cuda(8, 19, 512, 1024))
    assert reads("aten", Cuda(8, 32000, 128))
    assert reads("native", torch.empty(2, 3, 4))          # the CPU kernel: any K-dim input
