"""Accuracy of the native CPU kernel on bfloat16 and float16 logits against a float64 oracle, over many
rows: ordinary logits, logits of magnitude 1e3-1e4, rows with -inf entries and whole chunks of -inf,
with and without label smoothing and softcap.

The oracle is the closed form on the very same (half-precision) logits, in float64: lse = log sum exp z,
loss = lse - z_y (smoothed: (1 - eps) (lse - z_y) + eps/C sum_j (lse - z_j)), gradient = softmax - q.
The kernel computes in float32 and returns the lse and the loss in float32, so they are held to a
float32-sized error, tighter than the dtype's tolerance in helpers.TOL: half-precision inputs must not
make the float32 results coarser. The gradient is rounded to the logits' dtype, so it is held to one
unit in its last place. Every CPU instruction-set variant runs (a subprocess each, as in test_ops.py).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_xent

pytestmark = pytest.mark.skipif(not torch_xent.native_available("cpu"), reason="the CPU kernel is not built")

# Relative error bounds (float32's unit roundoff is 6e-8): the lse and loss are sums of about C terms,
# each exp within 3e-7 of the truth, combined in float32.
LSE_RTOL = 1e-6
LOSS_ATOL = 2e-6  # relative to 1 + |lse - max| + |loss|: the loss is computed relative to the row max

_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch_xent
    ops = torch.ops.torch_xent
    print("variant", torch_xent._native.cpu_kernel_variant())

    def problems(dtype, gen):
        big = 1e4 if dtype == torch.bfloat16 else 1e3 * 6  # float16 ends at 65504
        for m, c in ((256, 32000), (48, 128256), (2000, 1000), (3000, 77), (1000, 4100)):
            z = torch.randn(m, c, generator=gen, dtype=torch.float64) * 3
            r = torch.arange(m)
            z[r % 7 == 1] *= big / 3                                   # magnitude 1e3-1e4
            z[r % 7 == 2] += big                                        # shifted far from 0
            z[r % 7 == 3] = z[r % 7 == 3] * 20 - 50                     # wide spread, many underflows
            mask = torch.rand(m, c, generator=gen) < 0.1
            z[(r % 7 == 4)[:, None] & mask] = float("-inf")             # scattered -inf
            if c > 4096:
                z[r % 7 == 5, : c // 2] = float("-inf")                 # whole chunks of -inf
            y = torch.randint(0, c, (m,), generator=gen)
            zd = z.to(dtype)
            fin = torch.isfinite(zd.double().gather(1, y[:, None]))[:, 0]
            y = torch.where(fin, y, zd.double().argmax(1))             # a finite target: a finite loss
            yield zd, y

    def oracle(z, y, eps):
        z = z.double()
        c = z.shape[1]
        lse = torch.logsumexp(z, 1)
        mx = z.max(1).values
        loss = (1 - eps) * (lse - z.gather(1, y[:, None])[:, 0])
        q = torch.nn.functional.one_hot(y, c).double() * (1 - eps)
        if eps:
            fin = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
            loss = loss + eps * (lse - fin.mean(1))  # rows with -inf have an infinite smoothed loss
            loss = torch.where(torch.isinf(z).any(1), torch.full_like(loss, float("inf")), loss)
            q = q + eps / c
        grad = torch.softmax(z, 1) - q
        return lse, loss, grad, mx

    gen = torch.Generator().manual_seed(0)
    worst = {}
    for dtype in (torch.bfloat16, torch.float16):
        # One unit in the last place is at most 2^-7 |g| (bfloat16) or 2^-10 |g| (float16), or the spacing
        # of float16's denormals. bfloat16 reaches down to float32's denormals, where float32 arithmetic
        # itself has fewer digits than bfloat16 (an exp near its underflow): below 2^-100 only the
        # absolute error counts.
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        tiny = 2.0 ** (-100 if dtype == torch.bfloat16 else -24)
        for z, y in problems(dtype, gen):
            for eps in (0.0, 0.1):
                lse64, loss64, grad64, mx = oracle(z, y, eps)
                for layout, want_grad in (("rows", True), ("rows", False), ("positions", True), ("positions", False)):
                    if layout == "rows":
                        loss, lse, grad = ops.cross_entropy_forward(z, y, None, 0, -100, eps, 0.0, 0.0, want_grad)
                    else:  # the same rows as the positions of K-dimensional input, (1, C, M)
                        loss, lse, grad = ops.cross_entropy_forward(z.t().contiguous()[None], y[None], None, 0, -100,
                                                                    eps, 0.0, 0.0, want_grad)
                        loss, lse, grad = loss[0], lse[0], (grad[0].t() if want_grad else grad)
                    e_lse = ((lse.double() - lse64).abs() / lse64.abs().clamp_min(1)).max().item()
                    fin = torch.isfinite(loss64)
                    assert torch.equal(torch.isinf(loss), ~fin), "infinite losses differ"
                    scale = 1 + (lse64 - mx).abs() + loss64.abs()
                    e_loss = ((loss.double() - loss64).abs() / scale)[fin].max().item()
                    key = (str(dtype), layout, "lse")
                    worst[key] = max(worst.get(key, 0), e_lse)
                    key = (str(dtype), layout, "loss")
                    worst[key] = max(worst.get(key, 0), e_loss)
                    if want_grad:
                        # p_j = exp(z_j - lse) in float32 is as exact as the float32 lse, 2^-24 |lse|
                        # (and a few roundings): where g_j = p_j - q_j cancels, that is left, even
                        # if it exceeds g_j's last place.
                        p32 = 2.0 ** -22 * (1 + lse64.abs()[:, None]) * torch.softmax(z.double(), 1)
                        err = (grad.double() - grad64).abs() / (grad64.abs() * ulp + tiny + p32)
                        key = (str(dtype), layout, "grad ulps")
                        worst[key] = max(worst.get(key, 0), err.max().item())
    for k, v in sorted(worst.items()):
        print("worst", *k, "%.3g" % v)
    print("ok")
""")


def _variants():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_ops import _cpu_variants
    return _cpu_variants()


@pytest.mark.parametrize("variant", _variants())
def test_half_precision_accuracy(variant):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=variant.split("_")[0].lower(),
               TORCH_XENT_AVX512_BF16="1" if variant == "AVX512_BF16" else "0")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"variant {variant}\n" in proc.stdout, out
    assert proc.stdout.rstrip().endswith("ok"), out
    worst = {}
    for line in proc.stdout.splitlines():
        if line.startswith("worst "):
            _, dtype, layout, *what, value = line.split()
            worst[(dtype, layout, " ".join(what))] = float(value)
    print(variant, worst)
    assert {layout for _, layout, _ in worst} == {"rows", "positions"}, worst
    for (dtype, layout, what), value in worst.items():
        bound = {"lse": LSE_RTOL, "loss": LOSS_ATOL, "grad ulps": 1.0}[what]
        assert value <= bound, f"{variant} {dtype} {layout} {what}: worst error {value:.3g} above {bound:.3g}"
