"""vocab_parallel_cross_entropy in real processes (gloo over TCP on 127.0.0.1) against single-process
F.cross_entropy on the full logits: values and each rank's slice of the gradient."""

import datetime
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import TOL, expected_loss, free_port
from torch_xent.parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

N, V = 13, 23
SHARDS = {2: [9, 14], 3: [5, 11, 7]}  # uneven on purpose
CASES = [
    dict(reduction=r, label_smoothing=eps, z_loss=zl, ignore=ig, dtype=dt)
    for r in ("mean", "sum", "none")
    for eps in (0.0, 0.2)
    for zl in (0.0, 1e-2)
    for ig in (False, True)
    for dt in (torch.float64,)
] + [
    dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3, ignore=True, dtype=torch.float32),
    dict(reduction="none", label_smoothing=0.0, z_loss=0.0, ignore=True, dtype=torch.bfloat16),
    dict(reduction="mean", label_smoothing=0.0, z_loss=0.0, ignore="all", dtype=torch.float64),
    dict(reduction="sum", label_smoothing=0.3, z_loss=0.0, ignore=False, dtype=torch.float64, big=True),
]
D = 6
LINEAR_CASES = [
    dict(reduction=r, label_smoothing=eps, z_loss=zl, ignore=ig, bias=bias, chunk=chunk, given=given,
         dtype=torch.float64)
    for r, eps, zl, ig, bias, chunk, given in [
        ("mean", 0.0, 0.0, False, True, None, False),
        ("mean", 0.2, 1e-2, True, True, 4, True),
        ("sum", 0.1, 0.0, True, False, 5, False),
        ("none", 0.0, 1e-2, True, True, 4, False),
        ("none", 0.3, 0.0, False, False, 1, True),
        ("mean", 0.0, 0.0, "all", True, 4, False),
    ]
] + [dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3, ignore=True, bias=True, chunk=4, given=False,
          dtype=torch.float32)]


def _expected(logits, target, case):
    return expected_loss(logits, target, reduction=case["reduction"], label_smoothing=case["label_smoothing"],
                         z_loss=case["z_loss"])


def _make(case, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    if case.get("big"):
        logits = logits + 1e4  # needs the max-shifted sums
    target = torch.randint(0, V, (N,), generator=g)
    if case["ignore"] is True:
        target[::4] = -100
    elif case["ignore"] == "all":
        target[:] = -100
    grad_out = torch.randn(N, generator=g, dtype=torch.float64) if case["reduction"] == "none" \
        else torch.tensor(1.7, dtype=torch.float64)
    return logits, target, grad_out


def _assert_loss_close(got, want, dt):
    """The loss against the oracle, the tolerance scaled by the loss's size; returns the tolerance."""
    tol, _ = TOL[dt]["matmul"]
    scale = max(1.0, float(want.detach().abs().nan_to_num().max()))
    torch.testing.assert_close(got.detach().to(torch.float64), want.detach(), atol=tol * scale, rtol=tol,
                               equal_nan=True)
    return tol


def _check_case(rank, world, case, seed):
    dt = case["dtype"]
    logits, target, grad_out = _make(case, seed)
    sizes = SHARDS[world]
    lo = sum(sizes[:rank])
    full = logits.to(dt).to(torch.float64).clone().requires_grad_()
    want = _expected(full, target, case)
    (want * grad_out).sum().backward()
    shard = logits.to(dt)[:, lo:lo + sizes[rank]].detach().clone().requires_grad_()
    got = vocab_parallel_cross_entropy(shard, target, reduction=case["reduction"],
                                       label_smoothing=case["label_smoothing"], z_loss=case["z_loss"])
    assert got.dtype == dt
    (got.to(torch.float64) * grad_out).sum().backward()
    tol = _assert_loss_close(got, want, dt)
    want_grad = full.grad[:, lo:lo + sizes[rank]]
    if case["ignore"] == "all":
        want_grad = torch.zeros_like(want_grad)  # PyTorch's 0/0 gives NaN here; we keep ignored rows at 0
    torch.testing.assert_close(shard.grad.to(torch.float64), want_grad, atol=tol, rtol=tol)


def _check_linear_case(rank, world, case, seed):
    """The vocabulary-sharded classifier against F.cross_entropy(F.linear(x, W, b)) on the full W."""
    dt = case["dtype"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if case["bias"] else None
    _, target, grad_out = _make(case, seed)
    sizes = SHARDS[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    full = [t.to(dt).to(torch.float64).clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    want = _expected(torch.nn.functional.linear(*full), target, case)
    (want * grad_out).sum().backward()
    xs = x.to(dt).clone().requires_grad_()
    ws = w.to(dt)[lo:hi].clone().requires_grad_()
    bs = b.to(dt)[lo:hi].clone().requires_grad_() if b is not None else None
    extra = dict(vocab_start=lo, num_classes=V) if case["given"] else {}
    got = vocab_parallel_linear_cross_entropy(xs, ws, target, bias_shard=bs, reduction=case["reduction"],
                                              label_smoothing=case["label_smoothing"], z_loss=case["z_loss"],
                                              chunk_size=case["chunk"], **extra)
    assert got.dtype == dt
    (got.to(torch.float64) * grad_out).sum().backward()
    tol = _assert_loss_close(got, want, dt)
    pairs = [("input", xs.grad, full[0].grad), ("weight", ws.grad, full[1].grad[lo:hi])]
    if b is not None:
        pairs.append(("bias", bs.grad, full[2].grad[lo:hi]))
    for label, got_grad, want_grad in pairs:
        if case["ignore"] == "all":
            want_grad = torch.zeros_like(want_grad)
        gscale = max(1.0, float(want_grad.abs().max()))
        torch.testing.assert_close(got_grad.to(torch.float64), want_grad, atol=tol * gscale, rtol=tol,
                                   msg=lambda m, label=label: f"grad {label}: {m}")


def _worker(rank, world, port, results):
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        torch.set_num_threads(1)
        failures = []
        for i, case in enumerate(CASES):
            try:
                _check_case(rank, world, case, seed=100 + i)
            except Exception:  # noqa: BLE001 - collect every failing case, not only the first
                failures.append(f"case {case}: {traceback.format_exc(limit=3)}")
        for i, case in enumerate(LINEAR_CASES):
            try:
                _check_linear_case(rank, world, case, seed=200 + i)
            except Exception:  # noqa: BLE001
                failures.append(f"linear case {case}: {traceback.format_exc(limit=3)}")
        # The loss is the same on every rank: compare rank 0's value with everyone's.
        logits, target, _ = _make(CASES[0], 7)
        sizes = SHARDS[world]
        lo = sum(sizes[:rank])
        loss = vocab_parallel_cross_entropy(logits[:, lo:lo + sizes[rank]], target, label_smoothing=0.1)
        gathered = [torch.empty_like(loss) for _ in range(world)]
        dist.all_gather(gathered, loss)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            failures.append(f"loss differs across ranks: {gathered}")
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, failures))
    except Exception:  # noqa: BLE001
        results.put((rank, [traceback.format_exc()]))


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process(world):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    reports = {}
    try:
        while len(reports) < world and time.monotonic() < deadline:
            try:
                rank, failures = results.get(timeout=1.0)
                reports[rank] = failures
            except Exception:  # noqa: BLE001 - queue.Empty: poll again
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    assert len(reports) == world, f"only ranks {sorted(reports)} reported (hang or crash); exit codes " \
                                  f"{[p.exitcode for p in procs]}"
    problems = [f"rank {r}: {f}" for r in sorted(reports) for f in reports[r]]
    assert not problems, "\n".join(problems)


def test_without_process_group_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (4, 3), generator=g)
    target[0, 1] = -100
    got = vocab_parallel_cross_entropy(logits, target, label_smoothing=0.1, z_loss=0.0)
    want = F.cross_entropy(logits.reshape(-1, 7), target.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(got, want)
    (gg,) = torch.autograd.grad(got, logits)
    (wg,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(gg, wg)


def test_bad_target_raises():
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        vocab_parallel_cross_entropy(torch.randn(2, 5), torch.tensor([1, 9]))
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        vocab_parallel_cross_entropy(torch.randn(2, 5), torch.tensor([1, 2]), reduction="avg")


def test_linear_without_process_group_is_the_unfused_layer():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 9, (2, 5), generator=g)
    target[1, 2] = -100
    got = vocab_parallel_linear_cross_entropy(x, w, target, bias_shard=b, label_smoothing=0.1, chunk_size=3)
    want = F.cross_entropy(F.linear(x, w, b).reshape(-1, 9), target.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(got, want)
    for a, c in zip(torch.autograd.grad(got, (x, w, b)), torch.autograd.grad(want, (x, w, b))):
        torch.testing.assert_close(a, c)


def test_linear_bad_arguments():
    x, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_linear_cross_entropy(x, torch.randn(5, 3), t)
    with pytest.raises(ValueError, match="vocab_start and num_classes"):
        vocab_parallel_linear_cross_entropy(x, w, t, vocab_start=0)
    with pytest.raises(ValueError, match="do not fit"):
        vocab_parallel_linear_cross_entropy(x, w, t, vocab_start=2, num_classes=6)
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        vocab_parallel_linear_cross_entropy(x, w, torch.tensor([0, 7, 1]))
