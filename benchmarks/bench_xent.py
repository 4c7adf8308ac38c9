"""Softmax cross-entropy, side by side: PyTorch eager, torch.compile, torch_xent's reference and its kernel.

    python benchmarks/bench_xent.py                   # every CPU shape, writes benchmarks/results/cpu.md
    python benchmarks/bench_xent.py --quick           # fewer shapes and repetitions, prints only
    python benchmarks/bench_xent.py --shapes 8192x32000:float32 256x10:float32
    python benchmarks/bench_xent.py --device cuda     # GPU shapes, writes benchmarks/results/cuda-<gpu>.md

Contenders (all with reduction="mean"):
  eager       F.cross_entropy
  compile     torch.compile(F.cross_entropy, dynamic=True)
  reference   torch_xent.cross_entropy(impl="reference")   (pure PyTorch, the test oracle)
  native      torch_xent.cross_entropy(impl="native")      (the compiled kernel)
  inplace     the same with inplace_backward=True          (the gradient overwrites the logits)

Modes: "fwd+bwd" is the loss and torch.autograd.grad(loss, logits) for every contender; "fwd" is the loss
under torch.no_grad() (inplace is then the same as native and is left out).

The repetitions are interleaved (A, B, C, A, B, C, ...) so that a slow period of a shared machine hits
every contender alike, and the median is quoted. Columns:
  ms          median time of one call
  vs eager    eager's median / this median (above 1: faster than eager); vs compile the same
  GB/s        the bytes every implementation must move / time: the logits read once, plus the gradient
              written once for fwd+bwd
  x floor     time / (those bytes / the copy bandwidth measured in the same run, read + write of a large
              buffer): 1.0 would be as fast as a memory copy of the same traffic
  extra MB    peak memory of one call beyond its inputs. CPU: in a fresh subprocess, VmHWM (from
              /proc/self/status) after the call minus VmHWM once the inputs are allocated and touched
              (it includes the returned gradient, which every contender must produce). CUDA:
              torch.cuda.max_memory_allocated() minus the memory allocated before the call.
With inplace_backward the logits hold the gradient after the first repetition, so later repetitions run
on those (finite, small) values: the kernel's speed does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import torch_xent

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# (M, C, dtype, variant); variant: "" plain, "ignore" (every 4th row ignored), "smooth" (label_smoothing=0.1)
CPU_SHAPES = [
    (150, 3, "float32", ""),
    (256, 10, "float32", ""),
    (4096, 1000, "float32", ""),
    (4096, 1000, "float32", "ignore"),
    (4096, 1000, "float32", "smooth"),
    (8192, 32000, "float32", ""),
    (8192, 32000, "bfloat16", ""),
    (2048, 128256, "bfloat16", ""),
]
CPU_QUICK = [(256, 10, "float32", ""), (4096, 1000, "float32", ""), (8192, 32000, "float32", "")]
CUDA_SHAPES = ([(16384, c, dt, "") for dt in ("float32", "bfloat16") for c in (4096, 16384, 32768, 65536, 131072)]
               + [(8192, 262144, "bfloat16", "")])
CUDA_QUICK = [(16384, 32768, "float32", ""), (16384, 131072, "bfloat16", "")]
CONTENDERS = ["eager", "compile", "reference", "native", "inplace"]
MODES = ["fwd+bwd", "fwd"]
# Fresh-process memory is measured for problems at least this large (smaller ones are noise).
MEMORY_MIN_ELEMENTS = 1 << 24


def parse_shape(text):
    """"MxC[:dtype[:variant]]" -> (M, C, dtype, variant)."""
    parts = text.split(":")
    m, c = (int(v) for v in parts[0].lower().split("x"))
    dtype = parts[1] if len(parts) > 1 else "float32"
    variant = parts[2] if len(parts) > 2 else ""
    return m, c, dtype, variant


def shape_label(shape):
    m, c, dtype, variant = shape
    return f"{m}x{c} {dtype}" + (f" {variant}" if variant else "")


def loss_kwargs(variant):
    return {"label_smoothing": 0.1} if variant == "smooth" else {}


def make_inputs(shape, device, requires_grad):
    m, c, dtype, variant = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    # Filled in place, so that no temporary of the logits' size raises the memory high-water mark.
    logits = torch.empty(m, c, dtype=getattr(torch, dtype), device=device)
    if device == "cpu":
        logits.normal_(generator=g)
    else:
        logits.normal_()
    target = torch.randint(0, c, (m,), generator=g).to(device)
    if variant == "ignore":
        target[::4] = -100
    return logits.requires_grad_(requires_grad), target


def make_contender(name, variant):
    """Returns loss_fn(logits, target)."""
    kw = loss_kwargs(variant)
    if name == "eager":
        return lambda x, y: F.cross_entropy(x, y, **kw)
    if name == "compile":
        compiled = torch.compile(F.cross_entropy, dynamic=True)
        return lambda x, y: compiled(x, y, **kw)
    if name == "reference":
        return lambda x, y: torch_xent.cross_entropy(x, y, impl="reference", **kw)
    if name == "native":
        return lambda x, y: torch_xent.cross_entropy(x, y, impl="native", **kw)
    if name == "inplace":
        return lambda x, y: torch_xent.cross_entropy(x, y, impl="native", inplace_backward=True, **kw)
    raise ValueError(name)


def make_step(fn, mode, logits, target):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(logits, target)
    else:
        def step():
            loss = fn(logits, target)
            return torch.autograd.grad(loss, logits)
    return step


class Timer:
    def __init__(self, device):
        self.device = device

    def __call__(self, step, inner):
        """Seconds per call over `inner` back-to-back calls."""
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            step()
        return (time.perf_counter() - t0) / inner

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def copy_bandwidth(device, timer, nbytes=1 << 30, reps=7):
    """Bytes moved per second (read + write) by a copy of a large buffer."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timer(lambda: dst.copy_(src), 1) for _ in range(reps)]
    del src, dst
    return 2 * nbytes / statistics.median(times)


def available_contenders(device, names):
    out = []
    for name in names:
        if name in ("native", "inplace") and not torch_xent.native_available(device):
            print(f"  {name}: skipped, no compiled kernel for {device}", file=sys.stderr)
            continue
        out.append(name)
    return out


def time_shape(shape, mode, names, device, reps, timer):
    logits, target = make_inputs(shape, device, requires_grad=(mode == "fwd+bwd"))
    names = [n for n in names if not (mode == "fwd" and n == "inplace")]
    steps = {n: make_step(make_contender(n, shape[3]), mode, logits, target) for n in names}
    inner = {}
    for n, step in steps.items():  # warm up (compiles), then aim for samples of >= 20 ms
        step()
        timer.sync()
        once = timer(step, 1)
        inner[n] = max(1, min(1000, int(0.02 / max(once, 1e-7))))
    samples = {n: [] for n in names}
    for _ in range(reps):
        for n in names:
            samples[n].append(timer(steps[n], inner[n]))
    return {n: statistics.median(v) for n, v in samples.items()}


# ---- memory, CPU: one call in a fresh process


def _vm_hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def memory_worker(shape, mode, name):
    """Prints the extra peak resident bytes of one call (run in a fresh process)."""
    fn = make_contender(name, shape[3])
    # Warm up on a small problem first: compilation and first-call allocations are not the op's memory.
    small = (64, shape[1] if shape[1] <= 4096 else 4096, shape[2], shape[3])
    sl, st = make_inputs(small, "cpu", requires_grad=(mode == "fwd+bwd"))
    make_step(fn, mode, sl, st)()
    del sl, st
    logits, target = make_inputs(shape, "cpu", requires_grad=(mode == "fwd+bwd"))
    base = _vm_hwm_bytes()
    out = make_step(fn, mode, logits, target)()
    peak = _vm_hwm_bytes()
    del out
    print(json.dumps({"extra": peak - base}))


def cpu_memory(shape, mode, name):
    arg = f"{shape[0]}x{shape[1]}:{shape[2]}:{shape[3]}"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-worker", arg, mode, name],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  memory {name} {mode} {arg} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra"]


def cuda_memory(shape, mode, name):
    fn = make_contender(name, shape[3])
    logits, target = make_inputs(shape, "cuda", requires_grad=(mode == "fwd+bwd"))
    step = make_step(fn, mode, logits, target)
    step()  # compile and warm up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del out, logits, target
    torch.cuda.empty_cache()
    return extra


# ---- report


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def run(args):
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes]
    elif device == "cuda":
        shapes = CUDA_QUICK if args.quick else CUDA_SHAPES
    else:
        shapes = CPU_QUICK if args.quick else CPU_SHAPES
    reps = args.reps or (3 if args.quick else 7)
    names = available_contenders(device, args.contenders)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    timer = Timer(device)
    bw = copy_bandwidth(device, timer)
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)", flush=True)

    rows = []
    for shape in shapes:
        m, c, dtype, variant = shape
        elt = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        for mode in MODES:
            times = time_shape(shape, mode, names, device, reps, timer)
            nbytes = m * c * elt * (2 if mode == "fwd+bwd" else 1)
            measure_mem = not args.no_memory and m * c >= MEMORY_MIN_ELEMENTS
            for name, t in times.items():
                mem = None
                if measure_mem:
                    mem = cpu_memory(shape, mode, name) if device == "cpu" else cuda_memory(shape, mode, name)
                row = {
                    "shape": shape_label(shape), "mode": mode, "contender": name, "ms": t * 1e3,
                    "vs_eager": times["eager"] / t if "eager" in times else None,
                    "vs_compile": times["compile"] / t if "compile" in times else None,
                    "gbs": nbytes / t / 1e9, "x_floor": t / (nbytes / bw),
                    "extra_mb": None if mem is None else mem / 2**20,
                }
                rows.append(row)
                print(f"{row['shape']:>26} {mode:>7} {name:>9} {row['ms']:10.3f} ms  x{fmt(row['vs_eager'], '.2f')} eager"
                      f"  x{fmt(row['vs_compile'], '.2f')} compile  {row['gbs']:7.2f} GB/s  {row['x_floor']:6.2f} floor"
                      f"  {fmt(row['extra_mb'], '.0f')} MB", flush=True)
    return rows, bw, reps


def write_table(rows, bw, reps, device, path):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if device == "cuda":
        hw = f"GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    else:
        hw = (f"CPU: {cpu_model()}, {torch.get_num_threads()} threads, ATen CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}")
    lines = [
        f"# torch_xent benchmark ({device})",
        "",
        f"{now}; torch {torch.__version__}; {hw}; copy bandwidth {bw / 1e9:.1f} GB/s (read + write); "
        f"median of {reps} interleaved repetitions. Written by `python benchmarks/bench_xent.py"
        f"{' --device cuda' if device == 'cuda' else ''}` (its docstring defines the columns).",
        "",
        "| shape | mode | contender | ms | vs eager | vs compile | GB/s | x floor | extra MB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['mode']} | {r['contender']} | {r['ms']:.3f} | {fmt(r['vs_eager'], '.2f')} | "
                     f"{fmt(r['vs_compile'], '.2f')} | {r['gbs']:.2f} | {r['x_floor']:.2f} | "
                     f"{fmt(r['extra_mb'], '.0f')} |")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions; writes no results file")
    p.add_argument("--shapes", nargs="+", help="MxC[:dtype[:variant]], variant in {ignore, smooth}")
    p.add_argument("--contenders", nargs="+", default=CONTENDERS, choices=CONTENDERS)
    p.add_argument("--reps", type=int, default=0, help="interleaved repetitions (default 7, 3 with --quick)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--output", help="results file (default benchmarks/results/<device>.md; none with --quick)")
    p.add_argument("--memory-worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        shape, mode, name = args.memory_worker
        memory_worker(parse_shape(shape), mode, name)
        return
    rows, bw, reps = run(args)
    output = args.output
    if output is None and not args.quick and not args.shapes:
        if args.device == "cuda":
            gpu = torch.cuda.get_device_name().replace(" ", "-").lower()
            output = os.path.join(RESULTS, f"cuda-{gpu}.md")
        else:
            output = os.path.join(RESULTS, "cpu.md")
    if output:
        write_table(rows, bw, reps, args.device, output)


if __name__ == "__main__":
    main()
