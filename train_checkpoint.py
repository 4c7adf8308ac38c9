"""train.py's checkpoints: the file format, atomic writes, RNG state, and the checks a resume makes.

A checkpoint (format 1) is a dict that `torch.load(path, weights_only=True)` reads back:

    format       1
    model        the model's state_dict (the bare model, not the DistributedDataParallel wrapper)
    optimizer    the optimiser's state_dict
    epoch, batch the next batch to train (batch 0 of epoch e + 1 at the end of epoch e)
    step         the next global step
    epoch_sums   the epoch's running totals so far, a list of floats (train.EpochTotals, field by field)
    metrics      the last epoch's summary (train_loss, val_loss, ...)
    world_size   the number of processes that wrote it
    rng          torch, CUDA, NumPy and Python RNG states, in types weights_only accepts
    config       every setting of the run (train.py's SETTINGS) but --resume and --logdir
"""

import os
import random
import tempfile

import numpy as np
import torch

FILENAME = "checkpoint.pt"
FORMAT = 1
_TEMPORARY = (".checkpoint-", ".tmp")  # prefix and suffix of a file being written


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """Write to a temporary file in the same directory, fsync it, rename it over `path`, fsync the directory:
    a crash at any point leaves the old file or the new one, and a stray temporary at worst."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_TEMPORARY[0], suffix=_TEMPORARY[1])
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
    _fsync_dir(directory)


def remove_temporaries(directory):
    """Delete what a save killed half-way left behind (the checkpoint itself is whole either way)."""
    for name in os.listdir(directory):
        if name.startswith(_TEMPORARY[0]) and name.endswith(_TEMPORARY[1]):
            os.unlink(os.path.join(directory, name))


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


def save(path, *, model, optimizer, epoch, batch, step, epoch_sums, metrics, world_size, config):
    """Write a checkpoint of the format above, atomically; the RNG states are taken now."""
    atomic_save({"format": FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch, "batch": batch, "step": step, "epoch_sums": epoch_sums, "metrics": metrics,
                 "world_size": world_size, "rng": rng_state(), "config": config}, path)


def load(path, device=None):
    return torch.load(path, map_location=device, weights_only=True)


def mismatches(checkpoint, config, names):
    """The settings among `names` whose value in `config` differs from the checkpoint's, one line each."""
    return [f"--{k.replace('_', '-')} {checkpoint['config'][k]} (checkpoint) vs {config[k]}"
            for k in names if checkpoint["config"].get(k) != config[k]]
