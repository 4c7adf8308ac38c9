"""One training step of a small Llama-style transformers model: unpatched vs torch_xent.transformers.

    python benchmarks/bench_transformers.py                 # writes benchmarks/results/transformers-cpu.md
    python benchmarks/bench_transformers.py --vocab 32000 --rounds 1 --steps 2 --no-compile

The model: LlamaForCausalLM, hidden 256, intermediate 688, 2 layers, 4 heads, float32, untied head;
batch 4 x 256 tokens (1024 rows), labels = inputs (so every shifted position but the last counts).
A step is forward + backward with the gradients already allocated (zero_grad(set_to_none=False)),
as in a training loop; the optimiser is left out (the same for every contender).

Contenders:
  transformers          the model as transformers builds it: lm_head logits, ForCausalLMLoss (float32 logits)
  transformers+compile  the same model under torch.compile (inductor), compiled in warm-up steps
  torch_xent            torch_xent.transformers.apply_torch_xent(model): the head and the loss run as
                        torch_xent.linear_cross_entropy on the hidden states (no (tokens, vocab) logits)
  torch_xent loss only  apply_torch_xent(model, fused_linear=False): the logits exist, the loss is torch_xent's
  chunked (Liger-style) Liger-Kernel's fused linear cross-entropy algorithm written in PyTorch (its Triton
                        kernels need a GPU): rows in chunks of next_pow2(ceil(BT / ceil(V / H))), the chunk's
                        logits gradient from F.cross_entropy, grad_x and grad_W accumulated in the forward

Each (contender, vocabulary) runs in a fresh subprocess; rounds are interleaved so that a slow period of
a shared machine hits every contender alike. In each process: warm-up steps (2 under torch.compile, else 1),
then one step whose memory is measured: peak resident memory (VmHWM, reset through /proc/self/clear_refs
just before) minus the resident memory before it, i.e. what the step itself adds on top of the model, its
gradients and the inputs; then --steps timed steps (median).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

VOCABS = [32000, 128256]
CONTENDERS = ["transformers", "transformers+compile", "torch_xent", "torch_xent loss only", "chunked (Liger-style)"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "transformers-cpu.md")
BATCH, SEQ, HIDDEN = 4, 256, 256


def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def _liger_style_head(model):
    """Replaces model.forward's head + loss by a chunked linear cross-entropy in the style of Liger-Kernel."""
    import torch
    import torch.nn.functional as F

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, y):
            n, h = x.shape
            v = w.shape[0]
            inc = -(-v // h)
            chunk = 1 << max(0, (-(-n // inc) - 1).bit_length())
            count = (y != -100).sum()
            gx, gw = torch.empty_like(x), torch.zeros_like(w)
            total = torch.zeros((), dtype=torch.float32)
            for s in range(0, n, chunk):
                xc = x[s:s + chunk]
                with torch.enable_grad():
                    z = (xc @ w.t()).requires_grad_()
                    loss = F.cross_entropy(z, y[s:s + chunk], ignore_index=-100, reduction="sum")
                    (g,) = torch.autograd.grad(loss, z)
                total += loss.detach()
                torch.mm(g, w, out=gx[s:s + chunk])
                gw.addmm_(g.t(), xc)
            ctx.save_for_backward(gx.div_(count), gw.div_(count))
            return total / count

        @staticmethod
        def backward(ctx, grad_output):
            gx, gw = ctx.saved_tensors
            return gx * grad_output, gw * grad_output, None

    def forward(input_ids, labels):
        hidden = model.model(input_ids=input_ids).last_hidden_state
        target = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
        loss = ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, target)
        return type("Out", (), {"loss": loss})

    return forward


def worker(name, vocab, steps):
    import torch
    import transformers

    import torch_xent.transformers as txt

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=688,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=SEQ, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, vocab, (BATCH, SEQ))
    call = model
    if name == "torch_xent":
        txt.apply_torch_xent(model)
    elif name == "torch_xent loss only":
        txt.apply_torch_xent(model, fused_linear=False)
    elif name == "transformers+compile":
        call = torch.compile(model)
    elif name == "chunked (Liger-style)":
        call = _liger_style_head(model)

    def step():
        model.zero_grad(set_to_none=False)
        loss = call(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item()

    for _ in range(2 if name == "transformers+compile" else 1):
        step()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    loss = step()
    extra_mib = (_status_kib("VmHWM") - before) / 1024
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"loss": loss, "extra_mib": extra_mib, "ms": 1e3 * statistics.median(times),
                      "threads": torch.get_num_threads()}))


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="*", default=VOCABS)
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per contender and vocabulary")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (median)")
    ap.add_argument("--no-compile", action="store_true", help="leave out transformers+compile")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--worker", nargs=2, metavar=("CONTENDER", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), args.steps)

    import torch
    import transformers

    contenders = [c for c in CONTENDERS if not (args.no_compile and c == "transformers+compile")]
    runs = {}
    for vocab in args.vocab:
        for r in range(args.rounds):
            for name in contenders:
                res = subprocess.run([sys.executable, __file__, "--worker", name, str(vocab), "--steps",
                                      str(args.steps)], capture_output=True, text=True)
                if res.returncode != 0:
                    sys.exit(f"{name} V={vocab} failed:\n{res.stderr[-4000:]}")
                out = json.loads(res.stdout.strip().splitlines()[-1])
                runs.setdefault((vocab, name), []).append(out)
                print(f"V={vocab} round {r + 1} {name:24s} {out['ms']:9.1f} ms  extra {out['extra_mib']:7.0f} MiB  "
                      f"loss {out['loss']:.5f}", flush=True)

    lines = [
        "# One training step of a small Llama-style transformers model, CPU",
        "",
        f"CPU: {cpu_name()}, {runs[next(iter(runs))][0]['threads']} torch threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Produced by `python benchmarks/bench_transformers.py` "
        f"({args.rounds} fresh processes per row, interleaved; {args.steps} timed steps each; medians).",
        "",
        f"LlamaForCausalLM, hidden {HIDDEN}, 2 layers, float32, batch {BATCH} x {SEQ} tokens; a step is forward +",
        "backward with the gradients allocated. Extra peak = peak resident memory during one step minus the",
        "resident memory before it (model, gradients and inputs excluded). Ratios against the unpatched",
        "model (transformers eager) and its torch.compile: the median over the rounds of the ratio to the",
        "baseline's process in the same round (the machine is shared: single times vary by 2x or more).",
        "",
        "| vocab | contender | step (ms, median) | vs eager | vs compile | extra peak (MiB) | vs eager | loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for vocab in args.vocab:
        med = {n: (statistics.median(r["ms"] for r in runs[(vocab, n)]),
                   statistics.median(r["extra_mib"] for r in runs[(vocab, n)])) for n in contenders}
        def paired(n, base, key):
            """Median over the rounds of the ratio to the baseline's process of the same round."""
            if base not in med:
                return "-"
            return f"{statistics.median(a[key] / b[key] for a, b in zip(runs[(vocab, n)], runs[(vocab, base)])):.2f}x"

        for n in contenders:
            ms, mib = med[n]
            lines.append(f"| {vocab} | {n} | {ms:.0f} | {paired(n, 'transformers', 'ms')} | "
                         f"{paired(n, 'transformers+compile', 'ms')} | {mib:.0f} | "
                         f"{paired(n, 'transformers', 'extra_mib')} | {runs[(vocab, n)][0]['loss']:.5f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
