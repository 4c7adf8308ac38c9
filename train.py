"""Train a classifier with torch_xent.cross_entropy as its loss, and watch it in TensorBoard.

    python train.py                                   # iris, linear softmax classifier (a few seconds on a CPU)
    python train.py --model mlp                       # one hidden layer instead
    python train.py --task setosa                     # the worked example of docs/gradient.md: Setosa or not
    python train.py --dataset synthetic --num-classes 32768   # the loss at an LLM-like vocabulary size
    python train.py --check-grad                      # step 0: manual gradient vs finite differences and autograd
    python train.py --impl torch                      # F.cross_entropy instead, for comparison
    torchrun --standalone --nproc_per_node=2 train.py # DistributedDataParallel (gloo on CPU, nccl on GPU)
    tensorboard --logdir runs                         # then open http://localhost:6006

Every run writes TensorBoard events and `checkpoint.pt` into --logdir (default runs/<time>-<dataset>-<model>).
The checkpoint is written at every epoch end and when the run is stopped; `--resume --logdir DIR` continues
from it with the same global steps, and with the same seed ends with the same loss as a run never stopped
(data order is a function of (seed, epoch) only, so a run stopped mid-epoch resumes mid-epoch).
Checkpoints are written atomically (temporary file, fsync, rename): a kill at any moment leaves either
the previous checkpoint or the new one, never a torn file.

SIGTERM or Ctrl-C (SIGINT): the step in progress finishes, a checkpoint is saved, the run exits; a second
signal of the same kind exits at once (the last checkpoint is still whole).

Exit codes: 0 done; 2 bad arguments or a checkpoint that does not fit them; 3 non-finite loss or
gradient (nothing is saved at that step: the last checkpoint is the last good one); 128 + signal number
after a stop by signal with its checkpoint saved (130 for SIGINT, 143 for SIGTERM), so that a scheduler
can tell a stopped run from a finished one.

Beside this script: train_checkpoint.py (the checkpoint format, atomic saves, resume checks),
train_dashboard.py (TensorBoard's images, PR curves, histograms, custom scalars, hparams) and
train_diagnostics.py (the worked example and --check-grad at step 0).
"""

import argparse
import importlib.resources
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import astuple, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import torch_xent
import train_checkpoint
import train_dashboard
import train_diagnostics

# ----------------------------------------------------------------------------------------------------------
# Settings: this table is the only place each one is defined. Each is the flag --<name with dashes> and, once
# parsed, args.<name>; `python train.py --help` prints the help texts with the defaults.
# (name, default, type or list of choices, help); type bool is an on/off flag.
PER_DATASET = None  # default: the dataset's entry in DATASET_DEFAULTS below
SETTINGS = [
    ("dataset", "iris", ["iris", "synthetic"],
     "the data: iris (150 flowers, shipped in the package) or synthetic (many classes, generated)"),
    ("task", "species", ["species", "setosa"],
     "iris only: which labels, species (3 classes) or setosa (the worked example's binary task: Setosa or not, "
     "on raw petal length and width)"),
    ("model", "linear", ["linear", "mlp"], "the classifier: linear (softmax regression) or mlp (one hidden layer)"),
    ("hidden", 64, int, "width of the mlp's hidden layer"),
    ("impl", "auto", ["auto", "native", "reference", "torch"],
     "loss implementation: auto (the compiled kernel if built, else reference), native, reference, or torch "
     "(F.cross_entropy)"),
    ("epochs", PER_DATASET, int, "passes over the training set"),
    ("batch_size", PER_DATASET, int, "rows per step and process"),
    ("lr", PER_DATASET, float, "peak learning rate"),
    ("optimizer", PER_DATASET, ["sgd", "adamw"], "sgd (with momentum) or adamw"),
    ("momentum", 0.9, float, "sgd momentum"),
    ("weight_decay", 0.0, float, "weight decay (decoupled for adamw, L2 for sgd)"),
    ("lr_schedule", "cosine", ["cosine", "constant"],
     "learning-rate schedule: cosine (decays to --min-lr-ratio times --lr) or constant"),
    ("min_lr_ratio", 0.1, float, "the cosine schedule's floor, as a fraction of --lr"),
    ("warmup_steps", 0, int, "linear warm-up from 0 over this many steps"),
    ("grad_clip", 0.0, float, "clip the global gradient norm to this (0: no clipping; the norm is logged either way)"),
    ("label_smoothing", 0.0, float, "label smoothing, passed to the loss"),
    ("z_loss", 0.0, float, "z-loss coefficient: weight of the auxiliary lse**2 term (PaLM), passed to the loss"),
    ("ignore_fraction", 0.0, float, "share of training targets set to ignore_index, as padding would be"),
    ("seed", 1337, int, "RNG seed of the model initialisation and the data order"),
    ("data_seed", 0, int,
     "RNG seed of the train/validation split and the synthetic data (fixed, so that runs share a validation set)"),
    ("val_fraction", 0.2, float, "share of each class held out for validation (stratified)"),
    ("num_classes", 4096, int, "synthetic: number of classes"),
    ("num_features", 32, int, "synthetic: input dimension"),
    ("samples_per_class", 4, int,
     "synthetic: training rows per class (and a quarter of that, at least 1, for validation)"),
    ("log_every", 1, int, "steps between training scalars"),
    ("logdir", None, str, "run directory (default runs/<time>-<dataset>-<model>)"),
    ("resume", False, bool, "continue from the checkpoint in --logdir"),
    ("check_grad", False, bool, "compare gradients at step 0 and log the differences"),
    ("device", "auto", str, "auto (cuda if available), cpu, cuda or cuda:N"),
]
# Per-dataset defaults of the PER_DATASET settings: iris is tiny (a few hundred steps on one core), synthetic
# has many classes and wants larger batches and an adaptive optimiser.
DATASET_DEFAULTS = {
    "iris": dict(epochs=30, batch_size=16, lr=0.1, optimizer="sgd"),
    "synthetic": dict(epochs=3, batch_size=256, lr=0.03, optimizer="adamw"),
}
# Settings a resumed run must share with its checkpoint: they define the data, the model and the data order.
RUN_DEFINING = ("dataset", "task", "model", "hidden", "num_classes", "num_features", "samples_per_class",
                "val_fraction", "data_seed", "seed", "batch_size", "ignore_fraction", "optimizer")
# The worked example (docs/gradient.md): petal length and width (cm) of a Setosa, and the linear model's
# initial weights for --task setosa (rows are classes; class 0 = Setosa), with b = 0.
WORKED_EXAMPLE = json.loads(importlib.resources.files("torch_xent").joinpath("data", "worked_example.json").read_text())
WORKED_EXAMPLE_X, WORKED_EXAMPLE_W = WORKED_EXAMPLE["x"], WORKED_EXAMPLE["W"]
IGNORE_INDEX = -100       # target value whose rows do not count (PyTorch's default)
EXIT_BAD_ARGS, EXIT_NON_FINITE = 2, 3
# ----------------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those flags take a per-dataset default that their help names."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def per_dataset(key):
    return "default: " + ", ".join(f"{name} {d[key]}" for name, d in DATASET_DEFAULTS.items())


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the module docstring for more.",
                                 formatter_class=HelpFormatter)
for name, default, kind, text in SETTINGS:
    flag = "--" + name.replace("_", "-")
    if name in DATASET_DEFAULTS["iris"]:
        text += f" ({per_dataset(name)})"
    if kind is bool:
        parser.add_argument(flag, action="store_true", help=text)
    elif isinstance(kind, list):
        parser.add_argument(flag, choices=kind, default=default, help=text)
    else:
        parser.add_argument(flag, type=kind, default=default, help=text)
args = parser.parse_args()

for key, value in DATASET_DEFAULTS[args.dataset].items():
    if getattr(args, key) is None:
        setattr(args, key, value)
if args.dataset != "iris" and args.task != "species":
    parser.error("--task applies to --dataset iris only")
if args.task == "setosa" and args.model != "linear":
    parser.error("--task setosa starts from the worked example's weights of the linear model: use --model linear")
if args.resume and args.logdir is None:
    parser.error("--resume needs --logdir (the run directory holding checkpoint.pt)")
if args.epochs < 0 or args.batch_size < 1 or args.log_every < 1 or not 0.0 <= args.ignore_fraction <= 1.0:
    parser.error("need --epochs >= 0, --batch-size >= 1, --log-every >= 1 and 0 <= --ignore-fraction <= 1")
if not 0.0 < args.val_fraction < 1.0:
    parser.error("--val-fraction must be in (0, 1)")


def run_config():
    """Every setting but --resume and --logdir: what the checkpoint, config.json and hparams record."""
    return {k: v for k, v in vars(args).items() if k not in ("resume", "logdir")}


# ----------------------------------------------------------------------------------------------------------
# Processes and device. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run is a world of one.
ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
rank = int(os.environ.get("RANK", 0))
world_size = int(os.environ.get("WORLD_SIZE", 1))
local_rank = int(os.environ.get("LOCAL_RANK", 0))
master = rank == 0
if args.device == "auto":
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
device = torch.device(args.device)
if device.type == "cuda" and ddp:
    device = torch.device("cuda", local_rank)
if device.type == "cuda":
    if not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no GPU is visible")
    torch.cuda.set_device(device)
if ddp:
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def say(*parts):
    if master:
        print(*parts, flush=True)


writer = None  # the TensorBoard SummaryWriter, rank 0 only


def fail(message, code):
    """Every process leaves with the same message and code (the decision was made collectively)."""
    if master:
        print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    if writer is not None:
        writer.close()  # keep what was logged up to here
    if ddp:
        dist.destroy_process_group()
    sys.exit(code)


if args.impl == "native" and not torch_xent.native_available(device):
    fail(f"--impl native: no compiled kernel for {device.type} (see torch_xent.show_config()); "
         "use --impl auto", EXIT_BAD_ARGS)
loss_impl = args.impl  # the implementation in use: --impl, with auto resolved
if args.impl == "auto":
    loss_impl = "native" if torch_xent.native_available(device) else "reference"

# Run directory: rank 0 names it, the others learn it (a timestamp could differ between processes).
if args.logdir is None:
    args.logdir = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{args.dataset}"
                               + ("-setosa" if args.task == "setosa" else "") + f"-{args.model}")
if ddp:
    box = [args.logdir]
    dist.broadcast_object_list(box, src=0)
    args.logdir = box[0]
ckpt_path = os.path.join(args.logdir, train_checkpoint.FILENAME)

# ----------------------------------------------------------------------------------------------------------
# Data: everything lives in memory as tensors; a batch is an index slice.


def stratified_split(labels, fraction, generator):
    """Per class, a random `fraction` of the rows goes to validation; returns (train_idx, val_idx)."""
    train_idx, val_idx = [], []
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n_val = max(1, round(fraction * len(rows)))
        val_idx.append(rows[:n_val])
        train_idx.append(rows[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def load_iris():
    """The iris CSV shipped in the package: (features (150, 4) float32, species (150,) int64, names)."""
    text = importlib.resources.files("torch_xent").joinpath("data").joinpath("iris.csv").read_text()
    lines = [line.split(",") for line in text.strip().splitlines()[1:]]
    names = list(dict.fromkeys(row[4].strip() for row in lines))
    x = torch.tensor([[float(v) for v in row[:4]] for row in lines], dtype=torch.float32)
    y = torch.tensor([names.index(row[4].strip()) for row in lines], dtype=torch.int64)
    return x, y, names


def make_synthetic(classes, features, per_class, generator):
    """Gaussian blobs of unit noise around random centres, one per class: close enough that classes overlap
    (and few enough rows per class that validation lags training), so the loss falls from log(C) to a floor."""
    centres = torch.randn(classes, features, generator=generator)
    n_val = max(1, per_class // 4)
    y = torch.arange(classes).repeat_interleave(per_class + n_val)
    x = centres[y] + torch.randn(len(y), features, generator=generator)
    is_val = (torch.arange(len(y)) % (per_class + n_val)) >= per_class
    return x, y, is_val


data_gen = torch.Generator().manual_seed(args.data_seed)
if args.dataset == "iris":
    features, species, species_names = load_iris()
    train_idx, val_idx = stratified_split(species, args.val_fraction, data_gen)
    if args.task == "setosa":
        # The worked example's features are raw petal length and width (cm): not standardised, so that its
        # x = [1.9, 0.4] is an actual row and its numbers come out at step 0.
        features = features[:, 2:4]
        labels = (species != species_names.index("setosa")).long()  # class 0 = Setosa
        class_names = ["setosa", "non-setosa"]
    else:
        labels = species
        class_names = species_names
    x_train, y_train = features[train_idx], labels[train_idx]
    x_val, y_val = features[val_idx], labels[val_idx]
else:
    features, labels, is_val = make_synthetic(args.num_classes, args.num_features, args.samples_per_class, data_gen)
    x_train, y_train, x_val, y_val = features[~is_val], labels[~is_val], features[is_val], labels[is_val]
    class_names = [str(c) for c in range(args.num_classes)]
if args.task != "setosa":
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # training statistics only
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
if args.ignore_fraction > 0:
    drop = torch.rand(len(y_train), generator=data_gen) < args.ignore_fraction
    y_train = torch.where(drop, torch.full_like(y_train, IGNORE_INDEX), y_train)
n_classes = len(class_names)  # of the data in use (--num-classes is the synthetic data's setting)
x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))

# Data order is a function of (seed, epoch): DistributedSampler shuffles with seed + epoch and gives each
# process its share (a world of one gets everything), so a resumed run sees the same batches.
sampler = torch.utils.data.distributed.DistributedSampler(range(len(y_train)), num_replicas=world_size, rank=rank,
                                                          shuffle=True, seed=args.seed, drop_last=False)
steps_per_epoch = math.ceil(len(sampler) / args.batch_size)
total_steps = args.epochs * steps_per_epoch

# ----------------------------------------------------------------------------------------------------------
# Model, optimiser, loss

torch.manual_seed(args.seed)
random.seed(args.seed)
np.random.seed(args.seed)
in_features = x_train.shape[1]
if args.model == "linear":
    model = nn.Linear(in_features, n_classes)
else:
    model = nn.Sequential(nn.Linear(in_features, args.hidden), nn.ReLU(), nn.Linear(args.hidden, n_classes))
if args.task == "setosa":
    with torch.no_grad():
        model.weight.copy_(torch.tensor(WORKED_EXAMPLE_W))
        model.bias.zero_()
model.to(device)
raw_model = model
if ddp:
    model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
if args.optimizer == "sgd":
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
else:
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def lr_at(step):
    if args.warmup_steps and step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant" or total_steps <= args.warmup_steps + 1:
        return args.lr
    progress = (step - args.warmup_steps) / (total_steps - args.warmup_steps - 1)
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def loss_and_lse(logits, target, which=None, reduction="sum"):
    """The loss over the rows that count, and each row's log-sum-exp (0 for ignored rows, no gradient).

    torch_xent returns the lse its kernel computed; for F.cross_entropy it is computed here."""
    which = which or loss_impl
    if which != "torch":
        return torch_xent.cross_entropy_with_lse(logits, target, ignore_index=IGNORE_INDEX, reduction=reduction,
                                                 label_smoothing=args.label_smoothing, z_loss=args.z_loss,
                                                 impl=which)
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction=reduction,
                           label_smoothing=args.label_smoothing)
    valid = target != IGNORE_INDEX
    lse = torch.where(valid, torch.logsumexp(logits, dim=1), torch.zeros((), dtype=logits.dtype,
                                                                          device=logits.device))
    if args.z_loss:
        zl = args.z_loss * (lse * lse).sum()
        loss = loss + (zl / valid.sum() if reduction == "mean" else zl)
    return loss, lse.detach()


def row_statistics(logits, target, lse):
    """Sums over the counted rows of: correct predictions, lse, softmax entropy, probability of the target.

    With the kernel's lse, p = exp(z - lse) needs no second reduction over the classes, and
    entropy = -sum p log p = lse - sum p z."""
    logits = logits.detach().to(lse.dtype)
    valid = target != IGNORE_INDEX
    y = target.clamp_min(0)  # ignore_index is negative: those rows read class 0 and are masked below
    p = torch.exp(logits - lse.unsqueeze(1))
    entropy = lse - (p.unsqueeze(1) @ logits.unsqueeze(2)).flatten()
    p_target = torch.exp(logits.gather(1, y.unsqueeze(1)).flatten() - lse)
    correct = (logits.argmax(1) == target).to(lse.dtype)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    return torch.stack([torch.where(valid, v, zero).sum() for v in (correct, lse, entropy, p_target)])


@dataclass
class Totals:
    """Sums over the rows that count, all processes together: of one step, or of the epoch so far. The epoch's
    are in the checkpoint (as the list epoch_sums, in field order), so a resumed epoch reports the same numbers."""
    loss: float = 0.0             # the loss as the loss function sums it (smoothing and z-loss included)
    rows: float = 0.0             # rows whose target is not IGNORE_INDEX
    correct: float = 0.0          # rows whose argmax is the target
    lse: float = 0.0              # log-sum-exp of the logits
    entropy: float = 0.0          # entropy of the softmax
    p_target: float = 0.0         # softmax probability of the target
    skipped_batches: float = 0.0  # batches whose targets were all ignored (epoch totals only)

    def add(self, other):
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_list(self):
        return list(astuple(self))


# ----------------------------------------------------------------------------------------------------------
# Checkpoint: a fresh run refuses a directory that holds one; --resume continues from it.


def save_checkpoint(epoch, batch, step, epoch_totals, metrics):
    """epoch/batch: the next batch to train (batch 0 of epoch e+1 at an epoch's end). Rank 0 writes."""
    if master:
        train_checkpoint.save(ckpt_path, model=raw_model, optimizer=optimizer, epoch=epoch, batch=batch, step=step,
                              epoch_sums=epoch_totals.as_list(), metrics=metrics, world_size=world_size,
                              config=run_config())


start_epoch, start_batch, step, metrics = 0, 0, 0, {}
epoch_totals = Totals()
if master:
    os.makedirs(args.logdir, exist_ok=True)
    train_checkpoint.remove_temporaries(args.logdir)
if args.resume:
    if not os.path.exists(ckpt_path):
        fail(f"--resume: no {train_checkpoint.FILENAME} in {args.logdir}", EXIT_BAD_ARGS)
    ckpt = train_checkpoint.load(ckpt_path, device)
    changed = train_checkpoint.mismatches(ckpt, vars(args), RUN_DEFINING)
    if changed:
        fail("--resume with settings that change the data, model or data order: " + "; ".join(changed),
             EXIT_BAD_ARGS)
    if ckpt["batch"] and ckpt["world_size"] != world_size:
        fail(f"--resume mid-epoch needs the same number of processes as the checkpoint ({ckpt['world_size']})",
             EXIT_BAD_ARGS)
    raw_model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    train_checkpoint.set_rng_state(ckpt["rng"])
    start_epoch, start_batch, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
    epoch_totals, metrics = Totals(*ckpt["epoch_sums"]), dict(ckpt["metrics"])
    say(f"resuming {args.logdir} at epoch {start_epoch + 1}, batch {start_batch}, step {step}")
elif os.path.exists(ckpt_path):
    fail(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --logdir", EXIT_BAD_ARGS)

# ----------------------------------------------------------------------------------------------------------
# Signals: note the request; the loop acts on it between steps, all processes together.

stop_signal = 0


def on_signal(signum, frame):
    global stop_signal
    stop_signal = signum
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)

# ----------------------------------------------------------------------------------------------------------
# Logging: only rank 0 writes. purge_step makes TensorBoard drop whatever a stopped run logged after its
# checkpoint, so each step appears once.

if master:
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(args.logdir, purge_step=step if args.resume else None)
    if not args.resume:
        train_dashboard.add_layout(writer)
    config = run_config() | {"loss implementation used": loss_impl, "world size": world_size,
                             "torch": torch.__version__, "train rows": len(y_train), "validation rows": len(y_val),
                             "classes": n_classes}
    train_dashboard.add_config(writer, config, step)
    if args.dataset == "iris":  # which flowers were held out (0-based data rows of iris.csv), for reproducing
        config["validation row indices"] = val_idx.tolist()
    with open(os.path.join(args.logdir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
say(f"{args.dataset}{'/setosa' if args.task == 'setosa' else ''}: {len(y_train)} train and {len(y_val)} validation"
    f" rows, {n_classes} classes; {args.model} model; loss {loss_impl}; {world_size} process(es) on {device.type};"
    f" logging to {args.logdir}")

tty = master and sys.stdout.isatty()
if tty:
    from tqdm import tqdm


def evaluate():
    """Validation loss, accuracy and row statistics; predictions and probabilities for the images."""
    raw_model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    preds, probs = [], []
    with torch.no_grad():
        for i in range(0, len(y_val), 1024):
            logits, y = raw_model(x_val[i:i + 1024]), y_val[i:i + 1024]
            loss, lse = loss_and_lse(logits, y)
            sums += torch.cat([loss.double().reshape(1), row_statistics(logits, y, lse).double()])
            preds.append(logits.argmax(1))
            if n_classes <= train_dashboard.MAX_CLASSES_FOR_IMAGES:
                probs.append(logits.float().softmax(1))
    raw_model.train()
    n = len(y_val)
    loss, correct, lse, entropy, p_target = (s / n for s in sums.tolist())
    return {"loss": loss, "accuracy": correct, "lse": lse, "entropy": entropy, "p_target": p_target,
            "correct": int(round(correct * n)), "rows": n}, torch.cat(preds), (torch.cat(probs) if probs else None)


if master and step == 0:
    if args.task == "setosa":
        say(train_diagnostics.worked_example(raw_model, WORKED_EXAMPLE_X, WORKED_EXAMPLE_W, loss_and_lse, loss_impl,
                                             writer, device))
    if args.check_grad:
        say(train_diagnostics.check_gradients(raw_model, x_train, y_train, loss_and_lse, loss_impl, args.seed,
                                              IGNORE_INDEX, writer, device))

# ----------------------------------------------------------------------------------------------------------
# Training loop

t_start = time.perf_counter()
raw_model.train()
for epoch in range(start_epoch, args.epochs):
    sampler.set_epoch(epoch)
    order = torch.tensor(list(iter(sampler)), dtype=torch.int64, device=device)
    first = start_batch if epoch == start_epoch else 0
    if first == 0:
        epoch_totals = Totals()
    bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
               dynamic_ncols=True) if tty else None
    for b in range(first, steps_per_epoch):
        t0 = time.perf_counter()
        idx = order[b * args.batch_size:(b + 1) * args.batch_size]
        x, y = x_train[idx], y_train[idx]
        # One small all-reduce decides, for every process alike, whether to stop and how many rows count.
        flags = torch.tensor([float((y != IGNORE_INDEX).sum()), float(stop_signal == signal.SIGINT),
                              float(stop_signal == signal.SIGTERM)], dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(flags)
        n_counted, sigint, sigterm = flags.tolist()
        if sigint or sigterm:
            save_checkpoint(epoch, b, step, epoch_totals, metrics)
            signum = signal.SIGINT if sigint else signal.SIGTERM
            say(f"stopped by {signal.Signals(signum).name} before step {step} (epoch {epoch + 1}, batch {b}); "
                f"checkpoint saved. To continue, run the same command with --resume --logdir {args.logdir}")
            if writer:
                writer.close()
            if ddp:
                dist.destroy_process_group()
            sys.exit(128 + signum)
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if n_counted == 0:  # every target ignored (padding): nothing to learn from, not an error
            epoch_totals.skipped_batches += 1
            step += 1
            if bar:
                bar.update()
            continue
        logits = model(x)
        loss_sum, lse = loss_and_lse(logits, y)
        # Mean over the rows that count in all processes; DDP averages gradients over processes, hence * world_size.
        loss = loss_sum * (world_size / n_counted)
        stats = torch.cat([loss_sum.detach().double().reshape(1), row_statistics(logits, y, lse).double()])
        if ddp:
            dist.all_reduce(stats)
        loss_total, *row_totals = stats.tolist()  # row_statistics' order is Totals' order
        step_totals = Totals(loss_total, n_counted, *row_totals)
        if not math.isfinite(step_totals.loss):
            fail(f"non-finite loss ({step_totals.loss}) at step {step} (epoch {epoch + 1}, batch {b}, lr {lr:.3g}); "
                 f"stopping. Nothing was saved at this step: "
                 + (f"{ckpt_path} is the last good checkpoint (step {train_checkpoint.load(ckpt_path)['step']})"
                    if os.path.exists(ckpt_path) else "there is no checkpoint yet")
                 + ". A lower --lr may help.", EXIT_NON_FINITE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip).item()
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in raw_model.parameters()])).item()
        if not math.isfinite(grad_norm):
            fail(f"non-finite gradient norm ({grad_norm}) at step {step} (epoch {epoch + 1}, batch {b}); stopping "
                 "before the update. The last checkpoint is the last good one.", EXIT_NON_FINITE)
        optimizer.step()
        epoch_totals.add(step_totals)
        loss_value = step_totals.loss / n_counted
        if writer and step % args.log_every == 0:
            dt = time.perf_counter() - t0
            writer.add_scalar("train/loss", loss_value, step)
            writer.add_scalar("train/accuracy", step_totals.correct / n_counted, step)
            writer.add_scalar("train/lse", step_totals.lse / n_counted, step)
            writer.add_scalar("train/entropy", step_totals.entropy / n_counted, step)
            writer.add_scalar("train/p_target", step_totals.p_target / n_counted, step)
            writer.add_scalar("opt/lr", lr, step)
            writer.add_scalar("opt/grad_norm", grad_norm, step)
            writer.add_scalar("perf/samples_per_sec", len(idx) * world_size / max(dt, 1e-9), step)
        step += 1
        if bar:
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.4f}")
    if bar:
        bar.close()

    # End of the epoch: validation, images, one line, checkpoint. Logged at the epoch's last step (the
    # checkpoint's step is the next one, so a resume never purges these).
    at = step - 1
    n = max(epoch_totals.rows, 1)
    metrics = {"epoch": epoch + 1, "step": step, "train_loss": epoch_totals.loss / n,
               "train_accuracy": epoch_totals.correct / n}
    if master:
        val, preds, probs = evaluate()
        metrics |= {f"val_{k}": v for k, v in val.items()}
        for k in ("loss", "accuracy", "lse", "entropy", "p_target"):
            writer.add_scalar(f"val/{k}", val[k], at)
        writer.add_scalar("train/epoch_loss", metrics["train_loss"], at)
        train_dashboard.add_epoch_images(writer, raw_model, y_val, preds, probs, class_names, at)
        line = (f"epoch {epoch + 1:3d}/{args.epochs}  step {step:6d}  train loss {metrics['train_loss']:.4f} "
                f"acc {metrics['train_accuracy']:.3f}  val loss {val['loss']:.4f} acc {val['accuracy']:.3f} "
                f"({val['correct']}/{val['rows']})  lr {lr_at(at):.2e}  {time.perf_counter() - t_start:.1f}s")
        if epoch_totals.skipped_batches:
            line += f"  ({int(epoch_totals.skipped_batches)} all-ignored batches skipped)"
        tqdm.write(line) if tty else print(line, flush=True)
        writer.flush()
    save_checkpoint(epoch + 1, 0, step, Totals(), metrics)

# ----------------------------------------------------------------------------------------------------------
if master:
    if start_epoch < args.epochs:
        train_dashboard.add_hparams(writer, run_config() | {"loss_impl": loss_impl, "world_size": world_size},
                                    metrics)
        say(f"done in {time.perf_counter() - t_start:.1f}s: val loss {metrics['val_loss']:.4f}, val accuracy "
            f"{metrics['val_accuracy']:.4f} ({metrics['val_correct']}/{metrics['val_rows']}); "
            f"tensorboard --logdir {args.logdir}")
    else:
        say(f"nothing to train: --epochs {args.epochs}, and {args.logdir} is at epoch {start_epoch}")
    writer.close()
if ddp:
    dist.destroy_process_group()
