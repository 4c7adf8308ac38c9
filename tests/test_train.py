"""train.py end to end: real runs in subprocesses, read back with TensorBoard's own reader and server.

Every run uses one thread per process (OMP_NUM_THREADS=1), so that two runs of the same settings do the
same floating-point operations in the same order and can be compared exactly.
"""

import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from helpers import free_port, worked_example

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RUN_TIMEOUT = 240
pytestmark = pytest.mark.timeout(600)


def run_train(logdir, *args, expect=0):
    proc = subprocess.run([sys.executable, str(TRAIN), "--logdir", str(logdir), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    if expect is not None:
        assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def start_train(logdir, *args):
    return subprocess.Popen([sys.executable, str(TRAIN), "--logdir", str(logdir), *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_line(proc, needle, timeout=RUN_TIMEOUT):
    """Reads the process's output until a line containing `needle`; returns everything read."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    proc.wait()
    raise AssertionError(f"never printed {needle!r}:\n{''.join(seen)}")


def events(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


def series(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def load_checkpoint(logdir):
    return torch.load(Path(logdir) / "checkpoint.pt", weights_only=True)


def iris_rows():
    with open(ROOT / "torch_xent" / "data" / "iris.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [[float(v) for v in r[:4]] for r in rows], [r[4] for r in rows]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python train.py` with its defaults (only the log directory chosen)."""
    logdir = tmp_path_factory.mktemp("default") / "run"
    proc = run_train(logdir)
    return logdir, proc, events(logdir)


def test_help_lists_the_flags():
    proc = subprocess.run([sys.executable, str(TRAIN), "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--dataset", "--model", "--impl", "--epochs", "--batch-size", "--lr", "--seed", "--logdir",
                 "--device", "--resume", "--check-grad", "--task", "--num-classes", "--label-smoothing", "--z-loss"):
        assert flag in proc.stdout
    assert "default: None" not in proc.stdout  # the per-dataset defaults are spelled out instead
    assert "(default: iris 30, synthetic 3)" in " ".join(proc.stdout.split()), proc.stdout


def test_default_run_reaches_accuracy(default_run):
    logdir, proc, acc = default_run
    metrics = load_checkpoint(logdir)["metrics"]
    assert metrics["val_accuracy"] >= 0.93, proc.stdout
    assert series(acc, "val/accuracy")[-1][1] >= 0.93
    assert "done in" in proc.stdout and "val accuracy" in proc.stdout
    config = json.loads((logdir / "config.json").read_text())
    assert config["dataset"] == "iris" and config["model"] == "linear"
    # Stratified: 10 of each species held out.
    _, species = iris_rows()
    held_out = [species[i] for i in config["validation row indices"]]
    assert sorted(held_out) == sorted(["setosa", "versicolor", "virginica"] * 10)


def test_default_run_logs_every_tag_once_per_step(default_run):
    logdir, _, acc = default_run
    tags = acc.Tags()
    for tag in ("train/loss", "val/loss", "train/accuracy", "val/accuracy", "opt/lr", "opt/grad_norm",
                "perf/samples_per_sec", "train/entropy", "train/p_target", "train/lse", "val/entropy",
                "val/p_target", "val/lse"):
        assert tag in tags["scalars"], tag
    assert {"weights/weight", "grads/weight", "weights/bias", "grads/bias"} <= set(tags["histograms"])
    assert "val/confusion_matrix" in tags["images"]
    assert set(acc.PluginTagToContent("pr_curves")) == {"val_pr/setosa", "val_pr/versicolor", "val_pr/virginica"}
    assert "config/text_summary" in acc.PluginTagToContent("text")
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "batch_size" in text and "loss implementation used" in text

    from tensorboard.plugins.custom_scalar import layout_pb2
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = [chart for category in layout.category for chart in category.chart]
    assert any(set(chart.multiline.tag) == {"train/loss", "val/loss"} for chart in charts)

    hp = events(logdir / "hparams")
    assert "_hparams_/experiment" in hp.PluginTagToContent("hparams")
    assert hp.Scalars("hparam/val_accuracy")[0].value == pytest.approx(series(acc, "val/accuracy")[-1][1])

    image = acc.Images("val/confusion_matrix")[-1]
    assert image.width > 50 and image.height > 50

    # 30 epochs of 8 steps: each step logged once, validation at each epoch's last step.
    train = series(acc, "train/loss")
    assert [s for s, _ in train] == list(range(240))
    assert [s for s, _ in series(acc, "val/loss")] == [8 * e - 1 for e in range(1, 31)]
    first, last = sum(v for _, v in train[:8]) / 8, sum(v for _, v in train[-8:]) / 8
    assert last < 0.5 * first, (first, last)
    val = series(acc, "val/loss")
    assert val[-1][1] < 0.5 * val[0][1]
    # The per-row statistics obey their definitions: 0 <= entropy <= log C, p_target in (0, 1],
    # and mean p_target >= exp(-mean loss) (Jensen, as loss = -log p_target per row without smoothing).
    for (_, loss), (_, ent), (_, pt), (_, lse) in zip(train, series(acc, "train/entropy"),
                                                      series(acc, "train/p_target"), series(acc, "train/lse")):
        assert 0.0 <= ent <= math.log(3) + 1e-6
        assert 0.0 < pt <= 1.0 and pt >= math.exp(-loss) * (1 - 1e-5)
        assert math.isfinite(lse)
    lrs = [v for _, v in series(acc, "opt/lr")]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.01, rel=1e-3)


def test_tensorboard_server_serves_the_scalars(default_run):
    logdir, _, acc = default_run
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
                               "127.0.0.1", "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        query = urllib.parse.urlencode({"run": ".", "tag": "train/loss"})
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}"
        expected = series(acc, "train/loss")
        # The server loads in the background and answers with what it has read so far: wait for all of it.
        deadline, data = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read()
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    data = json.loads(response.read())
                if data and len(data) >= len(expected):
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        assert data, "the TensorBoard server never served train/loss"
        assert [row[1] for row in data] == [s for s, _ in expected]
        assert [row[2] for row in data] == pytest.approx([v for _, v in expected])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as response:
            assert "." in json.loads(response.read())
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_setosa_task_logs_the_worked_example(tmp_path):
    # One batch holds the whole training set, so step 0's loss is over known rows.
    proc = run_train(tmp_path, "--task", "setosa", "--epochs", 2, "--batch-size", 200)
    acc = events(tmp_path)
    # The worked example's scalars are logged under seed/<name>.
    example = {tag[len("seed/"):]: acc.Scalars(tag)[0] for tag in acc.Tags()["scalars"] if tag.startswith("seed/")}
    assert all(e.step == 0 for e in example.values())
    value = {k: e.value for k, e in example.items()}
    # The worked example, by hand: W rows are classes (class 0 = Setosa), x = petal length and width, b = 0.
    example = worked_example()
    x, w = example["x"], example["W"]
    z = [w[0][0] * x[0] + w[0][1] * x[1], w[1][0] * x[0] + w[1][1] * x[1]]
    p = [math.exp(z[0]) / (math.exp(z[0]) + math.exp(z[1])), math.exp(z[1]) / (math.exp(z[0]) + math.exp(z[1]))]
    assert z == pytest.approx(example["published"]["z"])
    assert [round(v, 6) for v in p] == example["published"]["softmax"]
    expected = {"z_0": z[0], "z_1": z[1], "softmax_0": p[0], "softmax_1": p[1], "loss": -math.log(p[0]),
                "dL_db_0": p[0] - 1, "dL_db_1": p[1]}
    expected |= {f"dL_dW_{i}_{j}": (p[i] - (i == 0)) * x[j] for i in range(2) for j in range(2)}
    assert set(expected) <= set(value)
    for k, v in expected.items():
        assert value[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    assert f"softmax = [{p[0]:.6f}, {p[1]:.6f}]" in proc.stdout
    grad_w = [[(p[i] - (i == 0)) * x[j] for j in range(2)] for i in range(2)]
    assert "[[{:.6f}, {:.6f}], [{:.6f}, {:.6f}]]".format(*grad_w[0], *grad_w[1]) in proc.stdout

    # The features are raw centimetres, not standardised: step 0's loss is the initial model's mean loss on
    # the raw petal measurements of the training rows.
    features, species = iris_rows()
    held_out = set(json.loads((tmp_path / "config.json").read_text())["validation row indices"])
    losses = []
    for i, (row, name) in enumerate(zip(features, species)):
        if i in held_out:
            continue
        zi = [w[c][0] * row[2] + w[c][1] * row[3] for c in range(2)]
        y = 0 if name == "setosa" else 1
        losses.append(math.log(math.exp(zi[0]) + math.exp(zi[1])) - zi[y])
    assert len(losses) == 120
    assert series(acc, "train/loss")[0][1] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_check_grad_differences_are_small(tmp_path):
    proc = run_train(tmp_path, "--check-grad", "--model", "mlp", "--epochs", 1, "--label-smoothing", 0.1,
                     "--z-loss", 1e-3)
    acc = events(tmp_path)
    fd = acc.Scalars("check/max_abs_diff_fd")[0]
    vs_torch = acc.Scalars("check/max_abs_diff_torch")[0]
    assert fd.step == 0 and vs_torch.step == 0
    assert fd.value < 1e-7, fd.value
    assert vs_torch.value < 1e-12, vs_torch.value
    assert "max |manual - finite difference|" in proc.stdout


def test_impl_torch_gives_the_same_training(default_run, tmp_path):
    """F.cross_entropy in place of torch_xent: the same run, step by step, up to rounding."""
    run_train(tmp_path, "--impl", "torch")
    a, b = events(tmp_path), default_run[2]
    for tag in ("train/loss", "train/lse", "train/entropy", "train/p_target", "val/loss"):
        sa, sb = series(a, tag), series(b, tag)
        assert [s for s, _ in sa] == [s for s, _ in sb]
        assert [v for _, v in sa] == pytest.approx([v for _, v in sb], rel=1e-4, abs=1e-6), tag


def test_resume_after_sigterm_matches_an_uninterrupted_run(tmp_path):
    settings = ("--batch-size", 2, "--epochs", 6)  # 60 steps an epoch, 360 in all
    run_train(tmp_path / "whole", *settings)

    stopped = tmp_path / "stopped"
    proc = start_train(stopped, *settings)
    wait_for_line(proc, "epoch   1/6")
    time.sleep(0.05)  # into the second epoch (the line comes just before the first checkpoint is saved)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=RUN_TIMEOUT)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out and "checkpoint saved" in out
    ckpt = load_checkpoint(stopped)
    assert 60 <= ckpt["step"] < 360 and ckpt["epoch"] * 60 + ckpt["batch"] == ckpt["step"]

    resumed = run_train(stopped, *settings, "--resume")
    assert f"resuming {stopped} at epoch {ckpt['epoch'] + 1}, batch {ckpt['batch']}, step {ckpt['step']}" \
        in resumed.stdout

    whole, again = load_checkpoint(tmp_path / "whole"), load_checkpoint(stopped)
    assert whole["step"] == again["step"] == 360
    for name, tensor in whole["model"].items():
        torch.testing.assert_close(again["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert again["metrics"]["val_loss"] == pytest.approx(whole["metrics"]["val_loss"], rel=0, abs=1e-6)
    assert again["metrics"]["train_loss"] == pytest.approx(whole["metrics"]["train_loss"], rel=0, abs=1e-6)

    a, b = events(tmp_path / "whole"), events(stopped)
    for tag in ("train/loss", "train/accuracy", "opt/lr", "val/loss", "val/accuracy"):
        sa, sb = series(a, tag), series(b, tag)
        steps = [s for s, _ in sb]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice"
        assert steps == [s for s, _ in sa], tag
        assert [v for _, v in sb] == pytest.approx([v for _, v in sa], rel=1e-6, abs=1e-7), tag

    # The checkpoint defines the data order: resuming with another seed is refused.
    refused = run_train(stopped, *settings, "--resume", "--epochs", 7, "--seed", 7, expect=2)
    assert "--seed" in refused.stderr


def temporaries(logdir):
    return {p for p in os.listdir(logdir) if p.endswith(".tmp")} if os.path.isdir(logdir) else set()


def test_sigkill_while_saving_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL at the worst moment: while a checkpoint is being written (its temporary file exists)."""
    settings = ("--dataset", "synthetic", "--num-classes", 2048, "--samples-per-class", 1, "--batch-size", 1024,
                "--epochs", 1000)  # a checkpoint of about a megabyte every two steps
    ckpt = tmp_path / "checkpoint.pt"
    killed_mid_write = 0
    for attempt in range(2):
        stale = temporaries(tmp_path)  # left by the previous kill; the next run removes them
        proc = start_train(tmp_path, *settings, *(("--resume",) if ckpt.exists() else ()))
        previous = load_checkpoint(tmp_path)["step"] if ckpt.exists() else -1
        inode = ckpt.stat().st_ino if ckpt.exists() else None  # each save renames a new file into place
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            saved = ckpt.exists() and ckpt.stat().st_ino != inode
            if saved and temporaries(tmp_path) - stale:  # a newer checkpoint exists and the next is being written
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.communicate(timeout=RUN_TIMEOUT)
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        killed_mid_write += bool(temporaries(tmp_path) - stale)
        state = load_checkpoint(tmp_path)  # whole, whatever the moment of the kill
        assert state["step"] == 2 * state["epoch"] > previous and state["batch"] == 0
        assert state["model"]["weight"].shape == (2048, 32)
    assert killed_mid_write, "no kill landed inside a checkpoint write"
    # The run goes on from what survived, and clears the torn temporaries.
    run_train(tmp_path, *settings[:-1], load_checkpoint(tmp_path)["epoch"] + 1, "--resume")
    assert not temporaries(tmp_path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run_train(tmp_path, "--model", "mlp", "--epochs", 1)
    before = hashlib.sha256((tmp_path / "checkpoint.pt").read_bytes()).hexdigest()
    step = load_checkpoint(tmp_path)["step"]
    # A learning rate of 1e30 makes the hidden layer ~1e30 and the logits overflow to inf after one update.
    proc = run_train(tmp_path, "--model", "mlp", "--epochs", 3, "--lr", 1e30, "--resume", expect=3)
    assert "non-finite loss" in proc.stderr and "last good checkpoint" in proc.stderr, proc.stderr
    assert hashlib.sha256((tmp_path / "checkpoint.pt").read_bytes()).hexdigest() == before
    assert load_checkpoint(tmp_path)["step"] == step
    assert all(math.isfinite(v) for _, v in series(events(tmp_path), "train/loss"))


def test_all_ignored_batches_are_skipped_not_errors(tmp_path):
    # Also the default run directory: runs/<time>-<dataset>-<model> under the working directory.
    flags = ["--ignore-fraction", "0.6", "--batch-size", "2", "--epochs", "2"]
    proc = subprocess.run([sys.executable, str(TRAIN), *flags], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all-ignored batches skipped" in proc.stdout
    (logdir,) = (tmp_path / "runs").iterdir()
    assert logdir.name.endswith("-iris-linear") and time.strptime(logdir.name[:15], "%Y%m%d-%H%M%S")
    logged = series(events(logdir), "train/loss")
    assert 0 < len(logged) < 120 and all(math.isfinite(v) for _, v in logged)
    assert load_checkpoint(logdir)["step"] == 120


def test_synthetic_many_classes(tmp_path):
    run_train(tmp_path, "--dataset", "synthetic", "--num-classes", 1000, "--epochs", 2)
    acc = events(tmp_path)
    loss = series(acc, "train/loss")
    assert loss[0][1] == pytest.approx(math.log(1000), abs=1.0)
    assert loss[-1][1] < loss[0][1] - 1.0
    assert "val/confusion_matrix" not in acc.Tags()["images"]  # too many classes to draw


def test_torchrun_two_processes_match_one_process_with_the_global_batch(tmp_path):
    ddp_dir = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(TRAIN), "--logdir", str(ddp_dir), "--epochs", "3", "--batch-size", "16"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout
    # Only rank 0 writes: one event file for the run and one for its hparams, one checkpoint, one report.
    written = sorted(str(p.relative_to(ddp_dir)) for p in ddp_dir.rglob("*") if p.is_file())
    event_files = [p for p in written if "events.out.tfevents" in p]
    assert len(event_files) == 2 and sum(p.startswith("hparams") for p in event_files) == 1, written
    assert set(written) - set(event_files) == {"checkpoint.pt", "config.json"}, written
    assert proc.stdout.count("done in") == 1 and proc.stdout.count("epoch   3/3") == 1, proc.stdout
    ckpt = load_checkpoint(ddp_dir)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 12  # 60 rows a process, 4 steps an epoch

    # Two processes of 16 rows see, step by step, the same 32 rows as one process with batches of 32
    # (DistributedSampler deals one shuffled order out in turn), and the loss is the mean over all of them.
    single_dir = tmp_path / "single"
    run_train(single_dir, "--epochs", 3, "--batch-size", 32)
    a, b = events(ddp_dir), events(single_dir)
    sa, sb = series(a, "train/loss"), series(b, "train/loss")
    assert [s for s, _ in sa] == [s for s, _ in sb] == list(range(12))
    assert [v for _, v in sa] == pytest.approx([v for _, v in sb], rel=1e-5)
    assert sa[-1][1] < sa[0][1]
    single = load_checkpoint(single_dir)
    for name, tensor in single["model"].items():
        torch.testing.assert_close(ckpt["model"][name], tensor, rtol=1e-5, atol=1e-6)


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path):
    """Ctrl-C behaves like SIGTERM: the step finishes, a whole checkpoint is saved, exit 128 + SIGINT."""
    proc = start_train(tmp_path, "--batch-size", 2, "--epochs", 50)
    wait_for_line(proc, "epoch   1/50")
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=RUN_TIMEOUT)[0]
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "stopped by SIGINT" in out and "Traceback" not in out, out
    ckpt = load_checkpoint(tmp_path)
    assert 60 <= ckpt["step"] < 3000 and ckpt["epoch"] * 60 + ckpt["batch"] == ckpt["step"]
    assert not temporaries(tmp_path)
