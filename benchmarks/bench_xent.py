"""Softmax cross-entropy, side by side: PyTorch eager, torch.compile, torch_xent's pure-PyTorch paths
(the fast one, impl="aten", with and without inplace_backward, and the readable reference) and its
native kernel (with and without inplace_backward, and without the reuse of gradient buffers).

    python benchmarks/bench_xent.py                  # CPU, full shape set -> benchmarks/results/cpu.md
    python benchmarks/bench_xent.py --quick          # fewer shapes and repetitions
    python benchmarks/bench_xent.py --shapes 8192x32000:float32,256x10:float32 --reps 7
    python benchmarks/bench_xent.py --shapes 8x19x512x1024:float32:seg      # K-dim (N, C, H, W) input
    python benchmarks/bench_xent.py --device cuda    # -> benchmarks/results/cuda-<gpu>.md

Every contender runs the same problem in the same process, repetitions interleaved (contender A,
B, C, ..., then again), and the table reports medians. Two modes:
  fwd+bwd  loss = f(logits); torch.autograd.grad(loss, logits)   (no .grad accumulation copy)
  fwd      loss = f(logits) under torch.no_grad()
The logits of each fwd+bwd repetition are a fresh copy made before the clock starts (the in-place
contender overwrites them), so every contender meets the same fresh memory. GB/s counts the least
traffic the mode needs: reading the logits once (fwd) and writing the gradient once (fwd+bwd); the
"x floor" column divides the time by that traffic at the bandwidth of a copy of the same logits into a
touched buffer, timed in the same interleaved rounds.
The native kernel reuses an idle gradient buffer of the same size from an earlier call (as a training
loop's steps do; torch_xent.set_gradient_cache): `native` runs with that reuse, `native-fresh` writes
every gradient into fresh memory, whose first touch is a page fault per page.
Peak memory is measured once per contender in a fresh subprocess: the peak resident memory (CPU) or
the peak allocated memory (CUDA) during one call, minus what was in use after the inputs were made.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import torch_xent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPU_SHAPES = ["150x3:float32", "256x10:float32", "4096x1000:float32", "8192x32000:float32",
              "8192x32000:bfloat16", "2048x128256:bfloat16", "8192x32000:float16", "2048x128256:float16",
              "4096x32000:float32:ignore", "4096x32000:float32:smooth"]
CPU_QUICK = ["150x3:float32", "256x10:float32", "4096x1000:float32", "2048x32000:bfloat16",
             "2048x32000:float32:smooth"]
CUDA_SHAPES = ([f"16384x{v}:{d}" for d in ("float32", "bfloat16") for v in (4096, 8192, 16384, 32768, 65536, 131072)]
               + ["8192x262144:bfloat16", "16384x32768:float32:ignore", "16384x32768:float32:smooth"])
CUDA_QUICK = ["16384x4096:float32", "16384x32768:bfloat16", "16384x32768:float32:smooth"]
# K-dimensional (N, C, d1, ..., dK) problems: a segmentation model's loss, ignore_index=255 (a tenth of
# the positions), with and without class weights.
CPU_KDIM = [f"{shape}:{d}:{v}" for shape in ("8x19x512x1024", "4x150x256x256") for d in ("float32", "bfloat16")
            for v in ("seg", "seg+weight")]
VARIANTS = {"": {}, "ignore": {"ignore_index": 0}, "smooth": {"label_smoothing": 0.1},
            "seg": {"ignore_index": 255}, "seg+weight": {"ignore_index": 255}}
WEIGHTED = {"seg+weight"}
CONTENDERS = ["eager", "compile", "reference", "aten", "aten-inplace", "native", "native-fresh", "native-inplace"]
MODES = ["fwd+bwd", "fwd"]
# Peak memory is measured for problems at least this large; below, a few pages of noise.
MEMORY_MIN_ELEMENTS = 1 << 20


# ---------------------------------------------------------------------------------------------
# Problems and contenders.

def parse_case(text):
    """'MxC:dtype[:variant]', or 'NxCxd1x...:dtype[:variant]' for K-dim input -> (shape, dtype, variant)."""
    shape, dtype, *rest = text.split(":")
    dims = tuple(int(v) for v in shape.lower().split("x"))
    variant = rest[0] if rest else ""
    if variant not in VARIANTS or len(dims) < 2:
        raise SystemExit(f"bad case {text!r}: a shape of 2 or more sizes, a variant of {sorted(VARIANTS)}")
    return dims, getattr(torch, dtype), variant


def case_name(dims, dtype, variant):
    return "x".join(map(str, dims)) + f":{str(dtype).replace('torch.', '')}" + (f":{variant}" if variant else "")


def make_inputs(dims, dtype, variant, device):
    """Logits of shape dims (classes in dim 1), class targets, and the class weights (or None)."""
    gen = torch.Generator(device=device).manual_seed(0)
    c = dims[1]
    logits = torch.empty(dims, dtype=dtype, device=device)
    flat = logits.view(-1)
    for r in range(0, flat.numel(), 1 << 22):  # in slices: no float32 copy of a large bfloat16 problem
        flat[r:r + (1 << 22)].normal_(generator=gen)
    tshape = (dims[0], *dims[2:])
    target = torch.randint(0, c, tshape, device=device, generator=gen)
    if variant == "ignore":  # a quarter of the rows are padding
        target[torch.rand(tshape, device=device, generator=gen) < 0.25] = 0
    if variant.startswith("seg"):  # unlabelled pixels
        target[torch.rand(tshape, device=device, generator=gen) < 0.1] = 255
    weight = None
    if variant in WEIGHTED:
        weight = (torch.rand(c, device=device, generator=gen) + 0.5).to(dtype)
    return logits, target, weight


def make_contender(name, variant, compile_cache, weight=None):
    """f(logits, target) -> loss for one contender; compile_cache keeps one compiled function."""
    kw = dict(VARIANTS[variant], weight=weight)
    if name == "eager":
        return lambda x, y: F.cross_entropy(x, y, **kw)
    if name == "compile":
        if "fn" not in compile_cache:
            compile_cache["fn"] = torch.compile(lambda x, y: F.cross_entropy(x, y, **kw), dynamic=False)
        return compile_cache["fn"]
    if name == "reference":
        return lambda x, y: torch_xent.cross_entropy(x, y, impl="reference", **kw)
    if name == "aten":
        return lambda x, y: torch_xent.cross_entropy(x, y, impl="aten", **kw)
    if name == "aten-inplace":
        return lambda x, y: torch_xent.cross_entropy(x, y, impl="aten", inplace_backward=True, **kw)
    if name == "native":
        return lambda x, y: torch_xent.cross_entropy(x, y, impl="native", **kw)
    if name == "native-fresh":  # without the reuse of idle gradient buffers: a fresh one each call
        # The op itself, not torch_xent.set_gradient_cache(False), which would also free the buffer
        # that the `native` contender's next repetition reuses.
        def fresh_buffer(x, y):
            torch.ops.torch_xent.cpu_set_gradient_cache(False)
            try:
                return torch_xent.cross_entropy(x, y, impl="native", **kw)
            finally:
                torch.ops.torch_xent.cpu_set_gradient_cache(True)
        return fresh_buffer
    if name == "native-inplace":
        return lambda x, y: torch_xent.cross_entropy(x, y, impl="native", inplace_backward=True, **kw)
    raise ValueError(name)


def available_contenders(device):
    names = list(CONTENDERS)
    if not torch_xent.native_available(device):
        print(f"note: no native kernel for {device}: native contenders skipped", file=sys.stderr)
        names = [n for n in names if not n.startswith("native")]
    return names


class Clock:
    """Wall-clock seconds of fn(); CUDA events on a GPU."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def one_call(fn, mode, logits, target, fresh):
    """Returns a callable doing one call of `mode`; `fresh` is the copy of the logits it may use."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(logits, target)
        return run

    def run():
        x = fresh.requires_grad_()
        loss = fn(x, target)
        torch.autograd.grad(loss, x)
    return run


def calls_per_rep(logits):
    """Small problems repeat the call within one timing so that a repetition lasts about 20 ms."""
    return max(1, min(200, int(2e6 // max(1, logits.numel()))))


def time_case(dims, dtype, variant, device, reps, names):
    logits, target, weight = make_inputs(dims, dtype, variant, device)
    clock = Clock(device)
    torch._dynamo.reset()  # a fresh compile per problem
    fns = {n: make_contender(n, variant, {}, weight) for n in names}
    k = calls_per_rep(logits)
    times = {(n, mode): [] for n in names for mode in MODES}
    # The floor's copy, timed in the same rounds: the logits into a buffer of their size, already touched.
    dst = torch.empty_like(logits).copy_(logits)
    copies = []
    for mode in MODES:
        for rep in range(reps + 1):  # the first round warms up (and compiles)
            t = clock(lambda: [dst.copy_(logits) for _ in range(k)]) / k
            if rep > 0:
                copies.append(t)
            for n in names:
                fresh = [logits.clone() for _ in range(k)] if mode == "fwd+bwd" else [None] * k
                calls = [one_call(fns[n], mode, logits, target, f) for f in fresh]
                t = clock(lambda: [call() for call in calls]) / k
                del fresh, calls
                if rep > 0:
                    times[(n, mode)].append(t)
    copy_bw = 2 * logits.numel() * logits.element_size() / statistics.median(copies)
    return {key: statistics.median(v) for key, v in times.items()}, copy_bw


def copy_bandwidth(device, reps):
    """Bytes per second moved by a large tensor copy (read + write), into an already-touched buffer."""
    numel = 256 << 20
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    clock = Clock(device)
    ts = [clock(lambda: dst.copy_(src)) for _ in range(reps + 2)][2:]
    return 2 * src.numel() * src.element_size() / statistics.median(ts)


# ---------------------------------------------------------------------------------------------
# Peak memory, one fresh subprocess per (case, contender, mode).

def _read_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(case, name, mode, device):
    """Runs in the subprocess: prints the extra peak bytes of one call."""
    dims, dtype, variant = parse_case(case)
    logits, target, weight = make_inputs(dims, dtype, variant, device)
    fn = make_contender(name, variant, {}, weight)
    for warm in (True, False):  # warm up (compile) first; measure the second call
        fresh = logits.clone() if mode == "fwd+bwd" else None
        call = one_call(fn, mode, logits, target, fresh)
        # The gradient buffer the warm-up left for reuse counts as this call's memory, not as the
        # baseline's: the native kernel's idle buffers are freed first.
        torch_xent.empty_cache()
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            call()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _read_status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (the peak resident set) to the current resident set
            call()
            peak = _read_status("VmHWM") - base
        del call, fresh
    print(json.dumps({"peak": peak}))


def measure_memory(case, name, mode, device):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", case, name, mode, "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        print(f"memory probe failed for {case} {name} {mode}: {proc.stderr[-500:]}", file=sys.stderr)
        return math.nan
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak"]


# ---------------------------------------------------------------------------------------------
# Report.

def machine_description(device):
    if device == "cuda":
        return torch.cuda.get_device_name(), f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return model, (f"{model}, {torch.get_num_threads()} threads, ATen CPU capability "
                   f"{torch.backends.cpu.get_cpu_capability()}")


def fmt(x, spec):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def build_table(results):
    lines = ["| problem | mode | contender | median ms | vs eager | vs compile | GB/s | x floor | extra peak MB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for case, (rows, copy_bw) in results.items():
        dims, dtype, _ = parse_case(case)
        elt = torch.empty((), dtype=dtype).element_size()
        for mode in MODES:
            floor_bytes = math.prod(dims) * elt * (2 if mode == "fwd+bwd" else 1)
            eager = rows.get(("eager", mode), {}).get("time")
            comp = rows.get(("compile", mode), {}).get("time")
            for (name, md), r in rows.items():
                if md != mode:
                    continue
                t = r["time"]
                lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    case, mode, name, fmt(t * 1e3, ".3f"),
                    fmt(eager / t if eager else None, ".2f") + "x",
                    fmt(comp / t if comp else None, ".2f") + "x",
                    fmt(floor_bytes / t / 1e9, ".1f"),
                    fmt(t / (floor_bytes / copy_bw), ".2f"),
                    fmt(r.get("peak", math.nan) / 2**20, ".1f")))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--shapes", help="comma-separated MxC:dtype[:variant] problems (NxCxd1x...: K-dim "
                        f"input); variants {', '.join(v for v in VARIANTS if v)}")
    parser.add_argument("--kdim", action="store_true", help="the K-dimensional (segmentation) problems only")
    parser.add_argument("--reps", type=int, help="timed repetitions per contender (default 7, quick 3)")
    parser.add_argument("--contenders", help=f"comma-separated subset of {','.join(CONTENDERS)}")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-contenders", help="measure the peak memory of these contenders only")
    parser.add_argument("--out", help="the markdown file to write (default benchmarks/results/<device>.md)")
    parser.add_argument("--memory-probe", nargs=3, metavar=("CASE", "CONTENDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_probe:
        memory_probe(*args.memory_probe, args.device)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    reps = args.reps or (3 if args.quick else 7)
    if args.shapes:
        cases = args.shapes.split(",")
    elif args.kdim:
        cases = CPU_KDIM
    elif args.device == "cuda":
        cases = CUDA_QUICK if args.quick else CUDA_SHAPES
    else:
        cases = CPU_QUICK if args.quick else CPU_SHAPES
    names = available_contenders(args.device)
    if args.contenders:
        names = [n for n in args.contenders.split(",") if n in names]

    copy_bw = copy_bandwidth(args.device, reps)
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write)", flush=True)
    results = {}
    copy_lines = []
    for case in cases:
        dims, dtype, variant = parse_case(case)
        name = case_name(dims, dtype, variant)
        t0 = time.perf_counter()
        medians, case_bw = time_case(dims, dtype, variant, args.device, reps, names)
        rows = {key: {"time": t} for key, t in medians.items()}
        copy_lines.append(f"{name} {case_bw / 1e9:.1f}")
        if not args.no_memory and math.prod(dims) >= MEMORY_MIN_ELEMENTS:
            for key in rows:
                if args.memory_contenders is None or key[0] in args.memory_contenders.split(","):
                    rows[key]["peak"] = measure_memory(name, key[0], key[1], args.device)
        results[name] = (rows, case_bw)
        summary = ", ".join(f"{n} {medians[(n, 'fwd+bwd')] * 1e3:.2f}" for n in names)
        print(f"{name}: fwd+bwd ms {summary} ({time.perf_counter() - t0:.0f} s)", flush=True)
    copy_bw_end = copy_bandwidth(args.device, reps)

    gpu_or_cpu, machine = machine_description(args.device)
    if args.out:
        out = args.out
    elif args.device == "cuda":
        out = os.path.join(ROOT, "benchmarks", "results", f"cuda-{re.sub(r'[^a-z0-9]+', '-', gpu_or_cpu.lower()).strip('-')}.md")
    else:
        out = os.path.join(ROOT, "benchmarks", "results", "cpu.md")
    load = ""
    if hasattr(os, "getloadavg"):
        load = " load average at the end {:.2f} {:.2f} {:.2f}.".format(*os.getloadavg())
    header = [
        f"# torch_xent benchmark ({args.device})",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- torch {torch.__version__}, torch_xent {torch_xent.__version__}",
        f"- machine: {machine}.{load}",
        f"- copy bandwidth (read + write of a 1 GiB tensor copy into a touched buffer): {copy_bw / 1e9:.1f} GB/s at "
        f"the start, {copy_bw_end / 1e9:.1f} GB/s at the end",
        "- the floor of each problem uses the copy of its own logits, timed in the same interleaved rounds as the "
        "contenders (GB/s, read + write): " + ", ".join(copy_lines),
        f"- PyTorch's CPU allocator huge pages (THP_MEM_ALLOC_ENABLE): "
        f"{'on' if os.environ.get('THP_MEM_ALLOC_ENABLE', '0') not in ('', '0') else 'off'}; the native kernel asks "
        "for them on its own gradient buffer",
        f"- {reps} interleaved repetitions per contender, medians; command: "
        f"`python benchmarks/bench_xent.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "fwd+bwd: `loss = f(logits); torch.autograd.grad(loss, logits)` on fresh logits; fwd: the loss under "
        "`torch.no_grad()`. GB/s: least traffic (read the logits; fwd+bwd also writes the gradient) over the "
        "time; x floor: time over that traffic at the problem's copy bandwidth. Extra peak: the peak memory of one call "
        "above what the inputs hold, in a fresh process.",
        "",
    ]
    text = "\n".join(header) + build_table(results) + "\n"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
