"""Train a tiny Llama-style Hugging Face model on the shipped essays, with torch_xent's fused loss.

    python examples/hf_tiny_llama.py                    # 300 steps, byte-level: 4 CPU-minutes (7 on a busy 2-core box)
    python examples/hf_tiny_llama.py --steps 50 --grad-accum 2
    python examples/hf_tiny_llama.py --no-torch-xent    # transformers' own head and loss, for comparison
    tensorboard --logdir runs                           # then open http://localhost:6006

The model is transformers' LlamaForCausalLM built from a small config with random weights (nothing is
downloaded); the tokenizer is the identity on UTF-8 bytes (vocabulary 256). One call,
``torch_xent.transformers.apply_torch_xent(model)``, makes every training forward with labels run the LM
head and the loss as ``torch_xent.linear_cross_entropy`` on the hidden states: the (tokens, vocab) logits
are never built. Gradient accumulation passes ``num_items_in_batch`` (the counted tokens of the whole step)
as transformers' Trainer does, so the accumulated gradient is the full batch's.

TensorBoard (same tags as train.py): train/loss every step; every --log-every steps train/accuracy,
train/lse, train/entropy and train/p_target of that step's first micro-batch, from the logits of a
no-grad evaluation forward after the update and torch_xent.cross_entropy_with_lse's lse (the kernel's own log-sum-exp;
p_target = exp(z_y - lse), entropy = lse - sum p z); opt/lr, opt/grad_norm, perf/tokens_per_sec; at
every --eval-every steps val/loss, val/accuracy, val/lse, val/entropy, val/p_target on the held-out
tail of the corpus, and a text sample (greedy continuation of --prompt); the configuration as text; a
custom-scalars chart with train and val loss together.
"""

import argparse
import math
import os
import time

import torch

import torch_xent

HERE = os.path.dirname(os.path.abspath(__file__))
IGNORE_INDEX = -100


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--corpus", default=os.path.join(HERE, "data", "essays.txt"), help="UTF-8 text file")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    ap.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")
    ap.add_argument("--hidden", type=int, default=128, help="model width")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    ap.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up, then cosine to lr / 10")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    ap.add_argument("--label-smoothing", type=float, default=0.0, help="passed to torch_xent's loss")
    ap.add_argument("--z-loss", type=float, default=0.0, help="coefficient of lse**2, passed to torch_xent's loss")
    ap.add_argument("--no-torch-xent", action="store_true", help="train with transformers' own head and loss")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="tail of the corpus held out")
    ap.add_argument("--log-every", type=int, default=10, help="steps between the statistics of the batch")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between validations and samples")
    ap.add_argument("--prompt", default="The lighthouse", help="start of the generated samples")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    ap.add_argument("--logdir", default=None, help="default runs/<time>-hf-tiny-llama")
    return ap.parse_args(argv)


def encode(text):
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def decode(ids):
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def batch_statistics(logits, labels):
    """Sums over the counted (shifted) positions: loss, rows, correct, lse, entropy, p_target."""
    z = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    y = labels[:, 1:].reshape(-1)
    loss, lse = torch_xent.cross_entropy_with_lse(z, y, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = y != IGNORE_INDEX
    z, y, lse = z[valid], y[valid], lse[valid]
    p = torch.exp(z - lse.unsqueeze(1))
    entropy = lse - (p * z).sum(1)
    p_target = torch.exp(z.gather(1, y.unsqueeze(1)).squeeze(1) - lse)
    correct = (z.argmax(1) == y).float()
    return torch.stack([loss.float(), valid.sum().float(), correct.sum(), lse.sum(), entropy.sum(), p_target.sum()])


def main(argv=None):
    args = parse_args(argv)
    import transformers
    from torch.utils.tensorboard import SummaryWriter

    import torch_xent.transformers as txt

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    with open(args.corpus, encoding="utf-8") as f:
        data = encode(f.read())
    n_val = max(args.seq_len + 1, int(len(data) * args.val_fraction))
    train_data, val_data = data[:-n_val], data[-n_val:]
    if len(train_data) <= args.seq_len:
        raise SystemExit(f"the corpus ({len(data)} bytes) is too small for --seq-len {args.seq_len}")

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.heads, max_position_embeddings=args.seq_len + 256,
                                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None)
    model = transformers.LlamaForCausalLM(config).to(device)
    if not args.no_torch_xent:
        txt.apply_torch_xent(model, label_smoothing=args.label_smoothing, z_loss=args.z_loss)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)

    def lr_at(step):
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        t = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    gen = torch.Generator().manual_seed(args.seed)

    def sample_batch():
        starts = torch.randint(0, len(train_data) - args.seq_len, (args.batch_size,), generator=gen)
        return torch.stack([train_data[s:s + args.seq_len] for s in starts.tolist()]).to(device)

    logdir = args.logdir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + "-hf-tiny-llama")
    writer = SummaryWriter(logdir)
    writer.add_custom_scalars({"loss": {"train and validation loss": ["Multiline", ["train/loss", "val/loss"]]}})
    settings = vars(args) | {"loss": "transformers" if args.no_torch_xent else "torch_xent (fused head)",
                             "parameters": sum(p.numel() for p in model.parameters()), "device": str(device),
                             "torch": torch.__version__, "transformers": transformers.__version__,
                             "train bytes": len(train_data), "validation bytes": len(val_data)}
    writer.add_text("config", "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |"
                                                                            for k, v in settings.items()), 0)

    def log_statistics(prefix, sums, step):
        loss, rows, correct, lse, entropy, p_target = (float(v) for v in sums)
        rows = max(rows, 1.0)
        for name, v in (("loss", loss), ("accuracy", correct), ("lse", lse), ("entropy", entropy),
                        ("p_target", p_target)):
            if prefix == "val" or name != "loss":
                writer.add_scalar(f"{prefix}/{name}", v / rows, step)
        return loss / rows

    @torch.no_grad()
    def evaluate(step):
        model.eval()
        sums = torch.zeros(6, dtype=torch.float64)
        windows = val_data.unfold(0, args.seq_len, args.seq_len)
        for i in range(0, len(windows), args.batch_size):
            ids = windows[i:i + args.batch_size].to(device)
            sums += batch_statistics(model(input_ids=ids).logits, ids).double().cpu()
        val_loss = log_statistics("val", sums, step)
        prompt = encode(args.prompt).unsqueeze(0).to(device)
        out = model.generate(prompt, max_new_tokens=120, do_sample=False)
        text = decode(out[0].tolist())
        writer.add_text("sample", text, step)
        model.train()
        return val_loss, text

    print(f"{'torch_xent fused' if not args.no_torch_xent else 'transformers'} loss, "
          f"{settings['parameters']} parameters, {len(train_data)} train bytes, device {device}; logs in {logdir}")
    model.train()
    t_start = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [sample_batch() for _ in range(args.grad_accum)]
        # As transformers' Trainer: the counted tokens of the whole step, so that the sum of the
        # micro-batch losses is the mean over the step.
        num_items = sum(int((ids[:, 1:] != IGNORE_INDEX).sum()) for ids in micro)
        optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        for ids in micro:
            out = model(input_ids=ids, labels=ids, num_items_in_batch=num_items)
            out.loss.backward()
            loss_value += out.loss.item()
        if not math.isfinite(loss_value):
            raise SystemExit(f"non-finite loss at step {step}")
        params = [p for p in model.parameters() if p.grad is not None]
        if args.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        optimizer.step()
        dt = time.perf_counter() - t0
        writer.add_scalar("train/loss", loss_value, step)
        writer.add_scalar("opt/lr", lr, step)
        writer.add_scalar("opt/grad_norm", grad_norm, step)
        writer.add_scalar("perf/tokens_per_sec", sum(ids.numel() for ids in micro) / max(dt, 1e-9), step)
        if step % args.log_every == 0 or step == args.steps - 1:
            # The fused training forward builds no logits: the statistics come from a no-grad forward of
            # this step's first micro-batch, after the update (the model as it is now).
            model.eval()
            with torch.no_grad():
                stats = batch_statistics(model(input_ids=micro[0]).logits, micro[0])
            model.train()
            log_statistics("train", stats, step)
            print(f"step {step:4d}  loss {loss_value:.4f}  p_target {float(stats[5] / stats[1]):.3f}  "
                  f"lse {float(stats[3] / stats[1]):.3f}  lr {lr:.2e}  {time.perf_counter() - t_start:.1f}s",
                  flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            val_loss, text = evaluate(step)
            print(f"step {step:4d}  val loss {val_loss:.4f}  sample: {text!r}", flush=True)
    writer.close()
    print(f"done in {time.perf_counter() - t_start:.1f}s; tensorboard --logdir {logdir}")
    return val_loss


if __name__ == "__main__":
    main()
