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
"""

import argparse
import copy
import importlib.resources
import json
import math
import os
import random
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import torch_xent

# ----------------------------------------------------------------------------------------------------------
# Settings (each is also a command-line flag; `python train.py --help`)
dataset = "iris"          # iris (150 flowers, shipped in the package) | synthetic (many classes, generated)
task = "species"          # iris only: species (3 classes) | setosa (the seed's binary task on petal length, width)
model_kind = "linear"     # linear (softmax regression, as in the seeds) | mlp (one hidden layer)
hidden = 64               # width of the mlp's hidden layer
impl = "auto"             # loss kernel: auto (compiled if built, else reference) | native | reference | torch
momentum = 0.9            # sgd momentum
weight_decay = 0.0        # decoupled for adamw, L2 for sgd
lr_schedule = "cosine"    # cosine (decays to min_lr_ratio * lr) | constant
min_lr_ratio = 0.1        # the cosine schedule's floor, as a fraction of --lr
warmup_steps = 0          # linear warm-up from 0 over this many steps
grad_clip = 0.0           # clip the global gradient norm to this (0: off; the norm is logged either way)
label_smoothing = 0.0     # passed to the loss
z_loss = 0.0              # coefficient of the auxiliary lse**2 term (PaLM), passed to the loss
ignore_fraction = 0.0     # fraction of training targets replaced by ignore_index, as padding would be
seed = 1337               # model initialisation and data order
data_seed = 0             # train/validation split and synthetic data (fixed, so runs share a validation set)
val_fraction = 0.2        # share of each class held out for validation (stratified)
num_classes = 4096        # synthetic: number of classes
num_features = 32         # synthetic: input dimension
samples_per_class = 4     # synthetic: training rows per class (and a quarter of that, at least 1, for validation)
log_every = 1             # steps between training scalars
device_name = "auto"      # auto (cuda if available) | cpu | cuda | cuda:N
# Per-dataset defaults for the flags left unset (optimizer: sgd with momentum | adamw): iris is tiny (a few
# hundred steps on one core), synthetic has many classes and wants larger batches and an adaptive optimiser.
DATASET_DEFAULTS = {
    "iris": dict(epochs=30, batch_size=16, lr=0.1, optimizer="sgd"),
    "synthetic": dict(epochs=3, batch_size=256, lr=0.03, optimizer="adamw"),
}
IGNORE_INDEX = -100       # target value whose rows do not count (PyTorch's default)
MAX_CLASSES_FOR_IMAGES = 32   # confusion matrix and per-class PR curves only up to this many classes
CHECK_GRAD_ROWS = 64      # --check-grad: training rows used
CHECK_GRAD_COORDS = 256   # --check-grad: parameters probed by finite differences (all if fewer)
CHECKPOINT = "checkpoint.pt"
# The seed's worked example (seed 000): petal length and width of a Setosa, and the initial weights
# (rows are classes; class 0 = Setosa).
SEED_X = [1.9, 0.4]
SEED_W = [[0.1, 0.1], [0.5, 0.5]]
# Settings a resumed run must share with its checkpoint: they define the data, the model and the data order.
RUN_DEFINING = ("dataset", "task", "model", "hidden", "num_classes", "num_features", "samples_per_class",
                "val_fraction", "data_seed", "seed", "batch_size", "ignore_fraction", "optimizer")
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
parser.add_argument("--dataset", choices=["iris", "synthetic"], default=dataset, help="the data")
parser.add_argument("--task", choices=["species", "setosa"], default=task, help="iris: which labels")
parser.add_argument("--model", choices=["linear", "mlp"], default=model_kind, help="the classifier")
parser.add_argument("--hidden", type=int, default=hidden, help="mlp hidden width")
parser.add_argument("--impl", choices=["auto", "native", "reference", "torch"], default=impl,
                    help="loss implementation (torch = F.cross_entropy)")
parser.add_argument("--epochs", type=int, default=None, help=f"passes over the training set ({per_dataset('epochs')})")
parser.add_argument("--batch-size", type=int, default=None,
                    help=f"rows per step and process ({per_dataset('batch_size')})")
parser.add_argument("--lr", type=float, default=None, help=f"peak learning rate ({per_dataset('lr')})")
parser.add_argument("--optimizer", choices=["sgd", "adamw"], default=None,
                    help=f"sgd (with momentum) or adamw ({per_dataset('optimizer')})")
parser.add_argument("--momentum", type=float, default=momentum, help="sgd momentum")
parser.add_argument("--weight-decay", type=float, default=weight_decay, help="weight decay")
parser.add_argument("--lr-schedule", choices=["cosine", "constant"], default=lr_schedule, help="learning-rate schedule")
parser.add_argument("--min-lr-ratio", type=float, default=min_lr_ratio, help="cosine floor / peak")
parser.add_argument("--warmup-steps", type=int, default=warmup_steps, help="linear warm-up steps")
parser.add_argument("--grad-clip", type=float, default=grad_clip, help="max gradient norm (0: no clipping)")
parser.add_argument("--label-smoothing", type=float, default=label_smoothing, help="label smoothing")
parser.add_argument("--z-loss", type=float, default=z_loss, help="z-loss coefficient")
parser.add_argument("--ignore-fraction", type=float, default=ignore_fraction,
                    help="share of training targets set to ignore_index")
parser.add_argument("--seed", type=int, default=seed, help="initialisation and data-order seed")
parser.add_argument("--data-seed", type=int, default=data_seed, help="split and synthetic-data seed")
parser.add_argument("--val-fraction", type=float, default=val_fraction, help="validation share of each class")
parser.add_argument("--num-classes", type=int, default=num_classes, help="synthetic: classes")
parser.add_argument("--num-features", type=int, default=num_features, help="synthetic: input dimension")
parser.add_argument("--samples-per-class", type=int, default=samples_per_class, help="synthetic: rows per class")
parser.add_argument("--log-every", type=int, default=log_every, help="steps between training scalars")
parser.add_argument("--logdir", default=None, help="run directory (default runs/<time>-<dataset>-<model>)")
parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --logdir")
parser.add_argument("--check-grad", action="store_true", help="compare gradients at step 0 and log the differences")
parser.add_argument("--device", default=device_name, help="auto | cpu | cuda | cuda:N")
args = parser.parse_args()

for key, value in DATASET_DEFAULTS[args.dataset].items():
    if getattr(args, key) is None:
        setattr(args, key, value)
if args.dataset != "iris" and args.task != "species":
    parser.error("--task applies to --dataset iris only")
if args.task == "setosa" and args.model != "linear":
    parser.error("--task setosa starts from the seed's weights of the linear model: use --model linear")
if args.resume and args.logdir is None:
    parser.error("--resume needs --logdir (the run directory holding checkpoint.pt)")
if args.epochs < 0 or args.batch_size < 1 or args.log_every < 1 or not 0.0 <= args.ignore_fraction <= 1.0:
    parser.error("need --epochs >= 0, --batch-size >= 1, --log-every >= 1 and 0 <= --ignore-fraction <= 1")
if not 0.0 < args.val_fraction < 1.0:
    parser.error("--val-fraction must be in (0, 1)")

# ----------------------------------------------------------------------------------------------------------
# Processes and device. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run is a world of one.
ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
rank = int(os.environ.get("RANK", 0))
world = int(os.environ.get("WORLD_SIZE", 1))
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
loss_impl = args.impl
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
ckpt_path = os.path.join(args.logdir, CHECKPOINT)

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
        # The seed's features are raw petal length and width (cm): not standardised, so that its
        # example x = [1.9, 0.4] is an actual row and its numbers come out at step 0.
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
n_classes = len(class_names)
x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))

# Data order is a function of (seed, epoch): DistributedSampler shuffles with seed + epoch and gives each
# process its share (a world of one gets everything), so a resumed run sees the same batches.
sampler = torch.utils.data.distributed.DistributedSampler(range(len(y_train)), num_replicas=world, rank=rank,
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
        model.weight.copy_(torch.tensor(SEED_W))
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


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """Write to a temporary file in the same directory, fsync it, rename it over `path`, fsync the directory:
    a crash at any point leaves the old file or the new one, and a stray temporary at worst."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def rng_state():
    """RNG states in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def run_config():
    return {k: v for k, v in vars(args).items() if k not in ("resume", "logdir")}


def save_checkpoint(epoch, batch, step, epoch_sums, metrics):
    """epoch/batch: the next batch to train (batch 0 of epoch e+1 at an epoch's end)."""
    if not master:
        return
    atomic_save({"format": 1, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch, "batch": batch, "step": step, "epoch_sums": epoch_sums, "metrics": metrics,
                 "world_size": world, "rng": rng_state(), "config": run_config()}, ckpt_path)


start_epoch, start_batch, step, metrics = 0, 0, 0, {}
epoch_sums = [0.0] * 7
if master:
    os.makedirs(args.logdir, exist_ok=True)
    for name in os.listdir(args.logdir):  # temporaries of a killed save
        if name.startswith(".checkpoint-") and name.endswith(".tmp"):
            os.unlink(os.path.join(args.logdir, name))
if args.resume:
    if not os.path.exists(ckpt_path):
        fail(f"--resume: no {CHECKPOINT} in {args.logdir}", EXIT_BAD_ARGS)
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    changed = [f"--{k.replace('_', '-')} {ckpt['config'][k]} (checkpoint) vs {getattr(args, k)}"
               for k in RUN_DEFINING if ckpt["config"].get(k) != getattr(args, k)]
    if changed:
        fail("--resume with settings that change the data, model or data order: " + "; ".join(changed),
             EXIT_BAD_ARGS)
    if ckpt["batch"] and ckpt["world_size"] != world:
        fail(f"--resume mid-epoch needs the same number of processes as the checkpoint ({ckpt['world_size']})",
             EXIT_BAD_ARGS)
    raw_model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    start_epoch, start_batch, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
    epoch_sums, metrics = list(ckpt["epoch_sums"]), dict(ckpt["metrics"])
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
        writer.add_custom_scalars({"loss": {"train and validation loss": ["Multiline", ["train/loss", "val/loss"]]}})
    config = run_config() | {"loss implementation used": loss_impl, "world size": world, "torch": torch.__version__,
                             "train rows": len(y_train), "validation rows": len(y_val), "classes": n_classes}
    table = "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in config.items())
    writer.add_text("config", table, step)
    if args.dataset == "iris":  # which flowers were held out (0-based data rows of iris.csv), for reproducing
        config["validation row indices"] = val_idx.tolist()
    with open(os.path.join(args.logdir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
say(f"{args.dataset}{'/setosa' if args.task == 'setosa' else ''}: {len(y_train)} train and {len(y_val)} validation"
    f" rows, {n_classes} classes; {args.model} model; loss {loss_impl}; {world} process(es) on {device.type};"
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
            if n_classes <= MAX_CLASSES_FOR_IMAGES:
                probs.append(logits.float().softmax(1))
    raw_model.train()
    n = len(y_val)
    loss, correct, lse, entropy, p_target = (s / n for s in sums.tolist())
    return {"loss": loss, "accuracy": correct, "lse": lse, "entropy": entropy, "p_target": p_target,
            "correct": int(round(correct * n)), "rows": n}, torch.cat(preds), (torch.cat(probs) if probs else None)


def confusion_image(matrix, names):
    """Rows are true classes, columns predicted; shade = share of the row, number = count. (H, W, 3) uint8."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    c = len(names)
    cell = max(12, min(56, 448 // c))
    label_w = int(max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font) for n in names)) + 12
    top = 40
    img = Image.new("RGB", (label_w + c * cell + 10, top + c * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((label_w, 4), "predicted ->   (rows: true class)", fill="black", font=font)
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    for i in range(c):
        draw.text((4, top + i * cell + cell // 2 - 6), names[i], fill="black", font=font)
        if cell >= 24:
            draw.text((label_w + i * cell + 2, top - 16), names[i][:cell // 7], fill="black", font=font)
        for j in range(c):
            s = float(share[i, j])
            colour = (int(255 - 215 * s), int(255 - 175 * s), int(255 - 75 * s))
            x0, y0 = label_w + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(200, 200, 200))
            if cell >= 24:
                draw.text((x0 + 4, y0 + cell // 2 - 6), str(int(matrix[i, j])), font=font,
                          fill="white" if s > 0.5 else "black")
    return np.asarray(img)


def log_epoch_images(preds, probs, at):
    for name, p in raw_model.named_parameters():
        writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), at)
        if p.grad is not None:
            writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), at)
    if probs is None:
        return
    truth = y_val.cpu().numpy()
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (truth, preds.cpu().numpy()), 1)
    writer.add_image("val/confusion_matrix", confusion_image(matrix, class_names), at, dataformats="HWC")
    probs = probs.cpu()
    for c, name in enumerate(class_names):
        writer.add_pr_curve(f"val_pr/{name}", torch.from_numpy(truth == c), probs[:, c], at)


def log_seed_example():
    """The seed's numbers for x = [1.9, 0.4] (a Setosa, class 0) with its initial weights, through this loss."""
    m = copy.deepcopy(raw_model).double()
    x = torch.tensor([SEED_X], dtype=torch.float64, device=device)
    y = torch.tensor([0], device=device)
    z = m(x)
    loss, _ = loss_and_lse(z, y, reduction="sum")
    loss.backward()
    z, p = z.detach()[0].tolist(), z.detach().softmax(1)[0].tolist()
    g_w, g_b = m.weight.grad.tolist(), m.bias.grad.tolist()
    values = {"loss": loss.item(), "z_0": z[0], "z_1": z[1], "softmax_0": p[0], "softmax_1": p[1],
              "dL_db_0": g_b[0], "dL_db_1": g_b[1]}
    values |= {f"dL_dW_{i}_{j}": g_w[i][j] for i in range(2) for j in range(2)}
    for k, v in values.items():
        writer.add_scalar(f"seed/{k}", v, 0)
    fmt = lambda v: "[" + ", ".join(f"{u:.6f}" for u in v) + "]"  # noqa: E731
    lines = [f"seed example x = {SEED_X} (Setosa, class 0), W = {SEED_W}, b = 0, loss {loss_impl}:",
             f"  z = W x + b = {fmt(z)}   softmax = {fmt(p)}   loss = -log p_0 = {loss.item():.6f}",
             f"  dL/dW = (p - onehot) x^T = [{fmt(g_w[0])}, {fmt(g_w[1])}]   dL/db = {fmt(g_b)}"]
    writer.add_text("seed", "\n".join("    " + line for line in lines), 0)
    say("\n".join(lines))


def check_gradients():
    """Float64 gradient of the batch loss with respect to every parameter, three ways: torch_xent's manual
    backward, central finite differences of torch_xent's forward, and autograd through F.cross_entropy."""
    m = copy.deepcopy(raw_model).double()
    x, y = x_train[:CHECK_GRAD_ROWS].double(), y_train[:CHECK_GRAD_ROWS]
    if not bool((y != IGNORE_INDEX).any()):
        say("check-grad: every target in the first rows is ignored; nothing to check")
        return
    which = loss_impl if loss_impl != "torch" else ("native" if torch_xent.native_available(device) else "reference")
    params = list(m.parameters())

    def grads(loss):
        m.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in params])

    manual = grads(loss_and_lse(m(x), y, which=which, reduction="mean")[0])
    autograd = grads(loss_and_lse(m(x), y, which="torch", reduction="mean")[0])
    coords = [(k, j) for k, p in enumerate(params) for j in range(p.numel())]
    probe = torch.randperm(len(coords), generator=torch.Generator().manual_seed(args.seed))[:CHECK_GRAD_COORDS]
    offsets = np.cumsum([0] + [p.numel() for p in params])
    h, diff_fd, rel_fd = 1e-6, 0.0, 0.0
    with torch.no_grad():
        for i in probe.tolist():
            k, j = coords[i]
            flat = params[k].view(-1)
            orig = flat[j].item()
            flat[j] = orig + h
            up = loss_and_lse(m(x), y, which=which, reduction="mean")[0].item()
            flat[j] = orig - h
            down = loss_and_lse(m(x), y, which=which, reduction="mean")[0].item()
            flat[j] = orig
            fd = (up - down) / (2 * h)
            g = manual[offsets[k] + j].item()
            diff_fd = max(diff_fd, abs(g - fd))
            rel_fd = max(rel_fd, abs(g - fd) / max(abs(fd), 1e-3))
    diff_torch = (manual - autograd).abs().max().item()
    writer.add_scalar("check/max_abs_diff_fd", diff_fd, 0)
    writer.add_scalar("check/max_rel_diff_fd", rel_fd, 0)
    writer.add_scalar("check/max_abs_diff_torch", diff_torch, 0)
    say(f"check-grad (float64, {len(y)} rows, {len(probe)} of {len(coords)} parameters, loss {which}): "
        f"max |manual - finite difference| = {diff_fd:.3e} (relative {rel_fd:.3e}), "
        f"max |manual - autograd of F.cross_entropy| = {diff_torch:.3e}")


if master and step == 0:
    if args.task == "setosa":
        log_seed_example()
    if args.check_grad:
        check_gradients()

# ----------------------------------------------------------------------------------------------------------
# Training loop. epoch_sums (over the epoch so far, all processes): loss, counted rows, correct, lse, entropy,
# p_target, skipped batches; kept in the checkpoint so a resumed epoch reports the same numbers.

t_start = time.perf_counter()
raw_model.train()
for epoch in range(start_epoch, args.epochs):
    sampler.set_epoch(epoch)
    order = torch.tensor(list(iter(sampler)), dtype=torch.int64, device=device)
    first = start_batch if epoch == start_epoch else 0
    if first == 0:
        epoch_sums = [0.0] * 7
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
            save_checkpoint(epoch, b, step, epoch_sums, metrics)
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
            epoch_sums[6] += 1
            step += 1
            if bar:
                bar.update()
            continue
        logits = model(x)
        loss_sum, lse = loss_and_lse(logits, y)
        # Mean over the rows that count in all processes; DDP averages gradients over processes, hence * world.
        loss = loss_sum * (world / n_counted)
        stats = torch.cat([loss_sum.detach().double().reshape(1), row_statistics(logits, y, lse).double()])
        if ddp:
            dist.all_reduce(stats)
        stats = stats.tolist()
        if not math.isfinite(stats[0]):
            fail(f"non-finite loss ({stats[0]}) at step {step} (epoch {epoch + 1}, batch {b}, lr {lr:.3g}); "
                 f"stopping. Nothing was saved at this step: "
                 + (f"{ckpt_path} is the last good checkpoint (step {torch.load(ckpt_path, weights_only=True)['step']})"
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
        loss_value = stats[0] / n_counted
        epoch_sums[0] += stats[0]
        epoch_sums[1] += n_counted
        for i in range(2, 6):
            epoch_sums[i] += stats[i - 1]
        if writer and step % args.log_every == 0:
            dt = time.perf_counter() - t0
            writer.add_scalar("train/loss", loss_value, step)
            writer.add_scalar("train/accuracy", stats[1] / n_counted, step)
            writer.add_scalar("train/lse", stats[2] / n_counted, step)
            writer.add_scalar("train/entropy", stats[3] / n_counted, step)
            writer.add_scalar("train/p_target", stats[4] / n_counted, step)
            writer.add_scalar("opt/lr", lr, step)
            writer.add_scalar("opt/grad_norm", grad_norm, step)
            writer.add_scalar("perf/samples_per_sec", len(idx) * world / max(dt, 1e-9), step)
        step += 1
        if bar:
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.4f}")
    if bar:
        bar.close()

    # End of the epoch: validation, images, one line, checkpoint. Logged at the epoch's last step (the
    # checkpoint's step is the next one, so a resume never purges these).
    at = step - 1
    n = max(epoch_sums[1], 1)
    metrics = {"epoch": epoch + 1, "step": step, "train_loss": epoch_sums[0] / n, "train_accuracy": epoch_sums[2] / n}
    if master:
        val, preds, probs = evaluate()
        metrics |= {f"val_{k}": v for k, v in val.items()}
        for k in ("loss", "accuracy", "lse", "entropy", "p_target"):
            writer.add_scalar(f"val/{k}", val[k], at)
        writer.add_scalar("train/epoch_loss", metrics["train_loss"], at)
        log_epoch_images(preds, probs, at)
        line = (f"epoch {epoch + 1:3d}/{args.epochs}  step {step:6d}  train loss {metrics['train_loss']:.4f} "
                f"acc {metrics['train_accuracy']:.3f}  val loss {val['loss']:.4f} acc {val['accuracy']:.3f} "
                f"({val['correct']}/{val['rows']})  lr {lr_at(at):.2e}  {time.perf_counter() - t_start:.1f}s")
        if epoch_sums[6]:
            line += f"  ({int(epoch_sums[6])} all-ignored batches skipped)"
        tqdm.write(line) if tty else print(line, flush=True)
        writer.flush()
    save_checkpoint(epoch + 1, 0, step, [0.0] * 7, metrics)

# ----------------------------------------------------------------------------------------------------------
if master:
    if start_epoch < args.epochs:
        hparams = {k: v for k, v in run_config().items() if isinstance(v, (int, float, str, bool))}
        hparams |= {"loss_impl": loss_impl, "world_size": world}
        writer.add_hparams(hparams, {"hparam/val_loss": metrics["val_loss"],
                                     "hparam/val_accuracy": metrics["val_accuracy"],
                                     "hparam/train_loss": metrics["train_loss"]}, run_name="hparams")
        say(f"done in {time.perf_counter() - t_start:.1f}s: val loss {metrics['val_loss']:.4f}, val accuracy "
            f"{metrics['val_accuracy']:.4f} ({metrics['val_correct']}/{metrics['val_rows']}); "
            f"tensorboard --logdir {args.logdir}")
    else:
        say(f"nothing to train: --epochs {args.epochs}, and {args.logdir} is at epoch {start_epoch}")
    writer.close()
if ddp:
    dist.destroy_process_group()
