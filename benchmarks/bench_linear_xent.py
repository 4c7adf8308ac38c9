"""Linear layer + cross-entropy, forward + backward: unfused vs torch's chunked vs torch_xent.

    python benchmarks/bench_linear_xent.py                 # all shapes, writes benchmarks/results/linear-cpu.md
    python benchmarks/bench_linear_xent.py --reps 1 --shapes 0

Contenders (all compute d loss / d input and d loss / d weight for a mean cross-entropy):
  unfused   F.cross_entropy(F.linear(x, W), y): the (N, V) logits, their log-softmax and gradient exist
  torch     F.linear_cross_entropy(x, W, y, options=torch.nn.LinearCrossEntropyOptions()) (chunked)
  torch_xent  torch_xent.linear_cross_entropy(x, W, y) (chunked, gradients in the forward)

Every run of every contender is a fresh subprocess, and the runs are interleaved (A, B, C, A, B, C, ...)
so that a slow period of a shared machine hits every contender alike. Each run reports:
  time   wall time of one forward + backward (median over the runs is quoted)
  memory extra peak resident memory: VmHWM (from /proc/self/status) after the step minus VmHWM once
         the inputs exist. It includes the gradients every contender must return (N*D + V*D elements).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [  # (N, D, V, dtype)
    (4096, 1024, 32000, "float32"),
    (4096, 1024, 32000, "bfloat16"),
    (1024, 1024, 128256, "float32"),
]
CONTENDERS = ["unfused", "torch", "torch_xent"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "linear-cpu.md")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def worker(name, n, d, v, dtype_name):
    import torch
    import torch.nn.functional as F

    from torch_xent import linear_cross_entropy

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    # Filled in place: a temporary here would raise VmHWM before the baseline is read.
    x = torch.empty(n, d, dtype=dtype).normal_(generator=g).requires_grad_()
    w = torch.empty(v, d, dtype=dtype).normal_(0.0, d ** -0.5, generator=g).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    if name == "unfused":
        def step():
            return F.cross_entropy(F.linear(x, w), y)
    elif name == "torch":
        opts = torch.nn.LinearCrossEntropyOptions()

        def step():
            return F.linear_cross_entropy(x, w, y, options=opts)
    else:
        def step():
            return linear_cross_entropy(x, w, y)
    # One small step first, so that one-time initialisation (kernel libraries, dispatch caches) is
    # neither timed nor counted as the step's memory.
    xs = torch.randn(64, d, dtype=dtype, requires_grad=True)
    ws = torch.randn(256, d, dtype=dtype, requires_grad=True)
    small = {"unfused": lambda: F.cross_entropy(F.linear(xs, ws), y[:64] % 256),
             "torch": lambda: F.linear_cross_entropy(xs, ws, y[:64] % 256,
                                                     options=torch.nn.LinearCrossEntropyOptions()),
             "torch_xent": lambda: linear_cross_entropy(xs, ws, y[:64] % 256)}[name]
    small().backward()
    base = _vm_hwm_bytes()
    t0 = time.perf_counter()
    loss = step()
    loss.backward()
    elapsed = time.perf_counter() - t0
    extra = _vm_hwm_bytes() - base
    grads_bytes = (x.grad.numel() + w.grad.numel()) * x.grad.element_size()
    print(json.dumps(dict(time=elapsed, extra=extra, loss=float(loss.detach()), grads=grads_bytes)))


def run_one(name, shape):
    n, d, v, dt = shape
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, str(n), str(d), str(v), dt]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="runs per contender and shape (fresh process each)")
    p.add_argument("--shapes", type=int, nargs="*", default=list(range(len(SHAPES))),
                   help="indices into SHAPES")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--worker", nargs=5, metavar=("NAME", "N", "D", "V", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        name, n, d, v, dt = args.worker
        worker(name, int(n), int(d), int(v), dt)
        return

    import torch

    rows = []
    header = ("| N | D | V | dtype | contender | time (s, median) | time / unfused | extra peak memory (MiB) "
              "| memory / unfused | loss |")
    sep = "|---|---|---|---|---|---|---|---|---|---|"
    print(header)
    print(sep)
    for i in args.shapes:
        shape = SHAPES[i]
        runs = {c: [] for c in CONTENDERS}
        for _ in range(args.reps):
            for c in CONTENDERS:
                runs[c].append(run_one(c, shape))
        t = {c: statistics.median(r["time"] for r in runs[c]) for c in CONTENDERS}
        m = {c: statistics.median(r["extra"] for r in runs[c]) for c in CONTENDERS}
        for c in CONTENDERS:
            row = (f"| {shape[0]} | {shape[1]} | {shape[2]} | {shape[3]} | {c} | {t[c]:.2f} | "
                   f"{t[c] / t['unfused']:.2f}x | {m[c] / 2**20:.0f} | {m[c] / m['unfused']:.2f}x | "
                   f"{runs[c][0]['loss']:.5f} |")
            rows.append(row)
            print(row, flush=True)
        grads = runs["unfused"][0]["grads"]
        rows.append(f"| | | | | (gradients themselves: {grads / 2**20:.0f} MiB) | | | | | |")
    text = "\n".join([
        "# Linear + cross-entropy, forward + backward, CPU",
        "",
        f"CPU: {_cpu_model()}; load average at the end {os.getloadavg()[0]:.1f} (a shared machine: compare the",
        "ratios, measured in the same interleaved rounds, rather than the times).",
        f"torch {torch.__version__}, {os.cpu_count()} CPU threads visible, {args.reps} interleaved fresh-process "
        "runs per contender (median). Produced by `python benchmarks/bench_linear_xent.py`.",
        "Extra peak memory = VmHWM after the step minus VmHWM with the inputs allocated; it includes the",
        "input and weight gradients that every contender returns.",
        "",
        header, sep, *rows, "",
    ])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
