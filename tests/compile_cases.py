"""torch.compile cases, each run in a fresh interpreter by tests/test_compile.py:

    python tests/compile_cases.py CASE

Each case makes its first torch_xent call inside a function compiled with ``fullgraph=True`` (so
nothing that torch_xent sets up lazily can hide behind an earlier call), compares the compiled
results with eager ones and prints ``OK CASE`` at the end; any mismatch raises.
"""

import sys

import torch

import torch_xent  # importing is allowed before: the first *call* happens under compile

TOL = dict(rtol=1e-9, atol=1e-10)  # float64 throughout, except the training step


def _ramp(t):
    return torch.linspace(0.5, 1.5, t.numel(), dtype=t.dtype).reshape(t.shape)


def _compare(fn, compiled, inputs, tol=TOL):
    """Values of every output, and the gradients of sum(output * ramp) with respect to each input."""
    results = []
    for f in (compiled, fn):  # compiled first: it must be the very first call
        leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        outs = f(*leaves)
        total = sum((o * _ramp(o)).sum() for o in outs)
        grads = torch.autograd.grad(total, [x for x in leaves if x.requires_grad])
        results.append(([o.detach() for o in outs], grads))
    (got, got_grads), (want, want_grads) = results
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape)
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, i=i: f"output {i}: {m}", **tol)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, i=i: f"gradient {i}: {m}", **tol)


def options(impl):
    """cross_entropy with every option: class and soft targets, weights, ignore_index, label smoothing,
    every reduction, z_loss, softcap, K-dimensional and unbatched input, inplace_backward."""
    gen = torch.Generator().manual_seed(0)
    n, c = 7, 5
    t = torch.randint(0, c, (n,), generator=gen)
    t[[1, 4]] = 2
    w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    tk = torch.randint(0, c, (2, 3), generator=gen)
    ce = torch_xent.cross_entropy

    def losses(x, q, xk, x1):
        out = []
        for red in ("mean", "sum", "none"):
            out += [ce(x, t, reduction=red, impl=impl),
                    ce(x, t, w, ignore_index=2, label_smoothing=0.1, reduction=red, impl=impl),
                    ce(x, t, ignore_index=2, z_loss=1e-3, softcap=3.0, reduction=red, impl=impl),
                    ce(x, q, w, label_smoothing=0.2, reduction=red, impl=impl),
                    ce(xk, tk, label_smoothing=0.1, reduction=red, impl=impl),
                    ce(x1, t[0], reduction=red, impl=impl),
                    ce(x * 2.0, t, reduction=red, inplace_backward=True, impl=impl)]
        return out

    x = torch.randn(n, c, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(n, c, generator=gen, dtype=torch.float64), 1).requires_grad_()
    xk = torch.randn(2, c, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    x1 = torch.randn(c, generator=gen, dtype=torch.float64, requires_grad=True)
    _compare(losses, torch.compile(losses, fullgraph=True), [x, q, xk, x1])


def train_step():
    """A small model with torch_xent.CrossEntropyLoss, compiled as a whole (model and loss), equal to
    eager over several optimiser steps."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    crit = torch_xent.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
    compiled = torch.compile(lambda x, y: crit(models[0](x), y), fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in models]
    for step in range(6):
        x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        y[::5] = -100
        losses = []
        for fn, opt in ((compiled, opts[0]), (lambda a, b: crit(models[1](a), b), opts[1])):
            loss = fn(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6, msg=f"step {step}")
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def linear(impl):
    """linear_cross_entropy forward and backward: every reduction, class and probability targets, a
    K-dimensional classifier, ignore_index, weights, smoothing, z_loss and softcap."""
    gen = torch.Generator().manual_seed(1)
    n, d, v = 9, 6, 11
    t = torch.randint(0, v, (n,), generator=gen)
    t[2] = -100
    cw = torch.rand(v, generator=gen, dtype=torch.float64) + 0.5
    tk = torch.randint(0, v, (n, 2), generator=gen)
    lce = torch_xent.linear_cross_entropy

    def losses(x, w, b, q, wk):
        out = []
        for red in ("mean", "sum", "none"):
            out += [lce(x, w, t, linear_bias=b, reduction=red, chunk_size=4, impl=impl),
                    lce(x, w, t, weight=cw, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                        reduction=red, impl=impl),
                    lce(x, w, q, reduction=red, chunk_size=4, impl=impl),
                    lce(x, wk, tk, reduction=red, chunk_size=4, impl=impl)]
        return out

    x = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(n, v, generator=gen, dtype=torch.float64), 1).requires_grad_()
    wk = torch.randn(v, 2, d, generator=gen, dtype=torch.float64, requires_grad=True)
    _compare(losses, torch.compile(losses, fullgraph=True), [x, w, b, q, wk])


def dynamic():
    """dynamic=True over several batch sizes: one graph for all of them, for cross_entropy and for
    linear_cross_entropy, each equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    for impl in ("reference", "aten", "native" if torch_xent.native_available("cpu") else "reference"):
        counters = [CompileCounterWithBackend("inductor") for _ in range(2)]

        def ce(x, t):
            return [torch_xent.cross_entropy(x, t, label_smoothing=0.1, impl=impl)]

        def lce(x, w, t):
            return [torch_xent.linear_cross_entropy(x, w, t, chunk_size=4, impl=impl)]

        compiled = [torch.compile(f, backend=cnt, dynamic=True, fullgraph=True) for f, cnt in zip((ce, lce), counters)]
        after_first = None
        for n in (5, 8, 13, 21):
            t = torch.randint(0, 7, (n,))
            _compare(ce, compiled[0], [torch.randn(n, 7, dtype=torch.float64, requires_grad=True), t])
            _compare(lce, compiled[1], [torch.randn(n, 3, dtype=torch.float64, requires_grad=True),
                                        torch.randn(7, 3, dtype=torch.float64, requires_grad=True), t])
            counts = [c.frame_count for c in counters]
            after_first = after_first or counts
            assert counts == after_first, f"{impl}: batch size {n} compiled again ({after_first} -> {counts})"
        assert all(c > 0 for c in after_first)


def out_of_range():
    """An out-of-range target under compile raises: RuntimeError from the in-graph assertion that
    replaces the host-side check (the reference path, and linear_cross_entropy's up-front check on
    the CPU), IndexError ("Target 7 is out of bounds.") from the compiled CPU kernel's own check."""
    x, t = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 7, 1, 2])
    cases = [("reference", RuntimeError, RuntimeError), ("aten", RuntimeError, RuntimeError)]
    if torch_xent.native_available("cpu"):
        cases.append(("native", IndexError, RuntimeError))
    for impl, ce_exc, lce_exc in cases:
        for fn, exc in ((lambda a, b: torch_xent.cross_entropy(a, b, impl=impl), ce_exc),
                        (lambda a, b: torch_xent.linear_cross_entropy(a, torch.eye(5), b, impl=impl), lce_exc)):
            compiled = torch.compile(fn, fullgraph=True)
            try:
                compiled(x, t).backward()
            except exc as e:
                assert "out of bounds" in str(e), str(e)
            else:
                raise AssertionError(f"{impl}: no error for an out-of-range target")


CASES = {"options-auto": lambda: options("auto"), "options-native": lambda: options("native"),
         "options-reference": lambda: options("reference"), "options-aten": lambda: options("aten"),
         "train-step": train_step,
         "linear-native": lambda: linear("native"), "linear-reference": lambda: linear("reference"),
         "dynamic": dynamic, "out-of-range": out_of_range}

if __name__ == "__main__":
    CASES[sys.argv[1]]()
    print(f"OK {sys.argv[1]}")
