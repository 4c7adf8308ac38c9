"""The CPU kernel's reuse of idle gradient buffers (set_gradient_cache, empty_cache).

A buffer may be reused only when nothing a caller can reach still references it; these tests hold
gradients, views of them and .grad, and check that nothing held is ever overwritten, that a reused
buffer is fully rewritten (no stale values from the call before), and that the cache can be turned
off, emptied, and turned off from the environment in a fresh process."""

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F

import torch_xent
from torch_xent import _native

pytestmark = pytest.mark.skipif(not torch_xent.native_available("cpu"), reason="the CPU kernel is not built")

# 2048 x 1024 float32 = 8 MiB: above the size from which buffers are kept.
ROWS, CLASSES = 2048, 1024
NBYTES = ROWS * CLASSES * 4


@pytest.fixture(autouse=True)
def _fresh_cache():
    torch_xent.set_gradient_cache(True)
    torch_xent.empty_cache()
    yield
    torch_xent.set_gradient_cache(True)
    torch_xent.empty_cache()


def _problem(seed, shape=(ROWS, CLASSES), ignore_frac=0.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=dtype) * 3
    classes = shape[1]
    target_shape = (shape[0],) + tuple(shape[2:])
    target = torch.randint(0, classes, target_shape, generator=gen)
    if ignore_frac:
        target[torch.rand(target_shape, generator=gen) < ignore_frac] = -100
    return base, target


def _grad(base, target, **kw):
    """d loss / d logits for non-leaf logits (as a model produces them), through torch_xent."""
    w = torch.ones((), requires_grad=True)
    logits = base * w
    loss = torch_xent.cross_entropy(logits, target, impl="native", **kw)
    return torch.autograd.grad(loss, logits)[0]


def _expected(base, target, **kw):
    logits = base.detach().clone().requires_grad_(True)
    F.cross_entropy(logits, target, **kw).backward()
    return logits.grad


def test_an_idle_buffer_is_reused_and_fully_rewritten():
    base1, target1 = _problem(0)
    g1 = _grad(base1, target1)
    del g1
    assert _native.gradient_cache_bytes() == NBYTES  # the first buffer, idle now
    # Many ignored rows: their gradient must be zero, not what the first call left there.
    base2, target2 = _problem(1, ignore_frac=0.5)
    g2 = _grad(base2, target2)
    assert _native.gradient_cache_bytes() == 0  # reused: had it allocated, the first would still be idle
    torch.testing.assert_close(g2, _expected(base2, target2), rtol=1e-5, atol=1e-7)
    assert (g2[target2 == -100] == 0).all()


def test_a_held_gradient_is_never_overwritten():
    base1, target1 = _problem(2)
    g1 = _grad(base1, target1)
    g1_copy = g1.clone()
    base2, target2 = _problem(3)
    g2 = _grad(base2, target2)
    assert g2.data_ptr() != g1.data_ptr()
    torch.testing.assert_close(g1, g1_copy, rtol=0, atol=0)
    torch.testing.assert_close(g2, _expected(base2, target2), rtol=1e-5, atol=1e-7)


def test_a_view_or_storage_keeps_the_buffer_held():
    base1, target1 = _problem(4)
    g1 = _grad(base1, target1)
    row = g1[5]
    row_copy = row.clone()
    storage = g1.untyped_storage()
    del g1
    assert _native.gradient_cache_bytes() == 0  # the view holds it
    g2 = _grad(*_problem(5))
    assert g2.data_ptr() != row.data_ptr() - 5 * CLASSES * 4
    torch.testing.assert_close(row, row_copy, rtol=0, atol=0)
    del row, g2
    assert _native.gradient_cache_bytes() == NBYTES  # g2's buffer; the storage object still holds g1's
    g3 = _grad(*_problem(6))
    assert g3.data_ptr() != storage.data_ptr()
    # Once the storage object goes too, the first buffer is idle again (nothing keeps it busy).
    del storage, g3
    assert _native.gradient_cache_bytes() == 2 * NBYTES
    g4 = _grad(*_problem(7))
    assert _native.gradient_cache_bytes() == NBYTES
    del g4


def test_share_memory_moves_the_gradient_out_of_the_pool():
    base, target = _problem(14)
    g = _grad(base, target)
    want = g.clone()
    g.share_memory_()  # the gradient now lives in shared memory; its old buffer is unused
    assert _native.gradient_cache_bytes() == NBYTES
    g2 = _grad(*_problem(15))  # takes the old buffer, not the shared memory
    assert g2.data_ptr() != g.data_ptr()
    torch.testing.assert_close(g, want, rtol=0, atol=0)


def test_two_losses_on_the_same_logits():
    """Autograd adds the two gradients (in place into one of them where it can): the sum is right."""
    base, target = _problem(16)
    _, other = _problem(17)
    for _ in range(3):
        w = torch.ones((), requires_grad=True)
        logits = base * w
        loss = torch_xent.cross_entropy(logits, target, impl="native") + torch_xent.cross_entropy(
            logits, other, impl="native", reduction="sum")
        g = torch.autograd.grad(loss, logits)[0]
        want = _expected(base, target) + _expected(base, other, reduction="sum")
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)
        del g
    assert _native.gradient_cache_bytes() <= 2 * NBYTES


def test_a_leaf_takes_the_buffer_into_grad_without_a_copy():
    base, target = _problem(18)
    leaf = base.clone().requires_grad_(True)
    torch_xent.cross_entropy(leaf, target, impl="native").backward()
    # AccumulateGrad stole the buffer (no copy): .grad holds it, so nothing is idle.
    assert _native.gradient_cache_bytes() == 0
    first = leaf.grad.clone()
    other = base.clone().requires_grad_(True)
    torch_xent.cross_entropy(other * 2, target, impl="native").backward()
    torch.testing.assert_close(leaf.grad, first, rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad, _expected(base, target), rtol=1e-5, atol=1e-7)
    # Accumulating into a held .grad (no zero_grad) adds, and leaves the earlier one as it was.
    torch_xent.cross_entropy(leaf, target, impl="native").backward()
    torch.testing.assert_close(leaf.grad, 2 * first, rtol=1e-6, atol=1e-7)


def test_k_dimensional_buffers_and_dtypes():
    """A reused buffer holds another problem's gradient: every element must be rewritten, including
    the positions of a wholly ignored batch item (whole tiles without a counted position)."""
    shape = (8, 19, 64, 257)
    for dtype in (torch.float32, torch.bfloat16):
        torch_xent.empty_cache()  # the float32 round's idle buffer would count below
        tol = dict(rtol=2e-2, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
        base, target = _problem(9, shape=shape, ignore_frac=0.2, dtype=dtype)
        target[3] = -100  # batch item 3: every position ignored
        other_base, other_target = _problem(8, shape=shape, dtype=dtype)
        for _ in range(3):
            stale = _grad(other_base, other_target)  # fills a buffer with another gradient...
            del stale
            g = _grad(base, target)  # ...that this call reuses
            assert _native.gradient_cache_bytes() == 0
            torch.testing.assert_close(g, _expected(base.float(), target).to(dtype), **tol)
            assert (g[3] == 0).all()
            del g


def test_disabled_and_emptied():
    g = _grad(*_problem(10))
    del g
    assert _native.gradient_cache_bytes() == NBYTES
    assert torch_xent.empty_cache() == NBYTES
    assert _native.gradient_cache_bytes() == 0
    torch_xent.set_gradient_cache(False)
    assert not _native.gradient_cache_enabled()
    g = _grad(*_problem(11))
    del g
    assert _native.gradient_cache_bytes() == 0
    assert "fresh each call" in torch_xent.show_config(file=open(os.devnull, "w"))
    torch_xent.set_gradient_cache(True)
    g = _grad(*_problem(12))
    del g
    assert _native.gradient_cache_bytes() == NBYTES


def test_small_buffers_are_not_kept():
    g = _grad(*_problem(13, shape=(64, 100)))
    del g
    assert _native.gradient_cache_bytes() == 0


def test_threads_share_the_cache_safely():
    problems = [_problem(20 + i, ignore_frac=0.1 * i) for i in range(4)]
    expected = [_expected(b, t) for b, t in problems]
    errors = []

    def worker(k):
        try:
            for step in range(6):
                i = (k + step) % len(problems)
                g = _grad(*problems[i])
                torch.testing.assert_close(g, expected[i], rtol=1e-5, atol=1e-7)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_environment_turns_it_off_in_a_fresh_process():
    code = textwrap.dedent("""
        import torch, torch_xent
        from torch_xent import _native
        x = torch.randn(2048, 1024, requires_grad=True)
        torch_xent.cross_entropy(x * 1, torch.randint(0, 1024, (2048,))).backward()
        print(_native.gradient_cache_enabled(), _native.gradient_cache_bytes())
        torch_xent.show_config()
    """)
    for off in ("0", "false", "Off"):
        env = dict(os.environ, TORCH_XENT_GRADIENT_CACHE=off)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True).stdout
        assert out.splitlines()[0] == "False 0"
        assert "fresh each call" in out
    env["TORCH_XENT_GRADIENT_CACHE"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == f"True {NBYTES}"
    assert "reused across calls" in out
