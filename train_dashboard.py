"""train.py's TensorBoard extras beyond the scalars: the loss chart, the configuration, histograms, the
confusion matrix, per-class PR curves and hparams. Every function takes the SummaryWriter (rank 0's).

Tags (the README and the tests rely on them): custom scalars "loss"; text "config"; histograms weights/<name>,
grads/<name>; image val/confusion_matrix; PR curves val_pr/<class>; hparams in the run's "hparams" subfolder
with hparam/val_loss, hparam/val_accuracy, hparam/train_loss.
"""

import numpy as np
import torch

MAX_CLASSES_FOR_IMAGES = 32  # confusion matrix and per-class PR curves only up to this many classes


def add_layout(writer):
    """The custom-scalars chart: train and validation loss in one plot."""
    writer.add_custom_scalars({"loss": {"train and validation loss": ["Multiline", ["train/loss", "val/loss"]]}})


def add_config(writer, config, step):
    """The run's settings as a two-column table."""
    table = "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in config.items())
    writer.add_text("config", table, step)


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


def add_epoch_images(writer, model, truth, preds, probs, class_names, at):
    """Weight and gradient histograms; with `probs` (only computed for a few classes), the confusion matrix of
    the validation predictions and one PR curve per class. truth, preds: (N,) int64; probs: (N, C) or None."""
    for name, p in model.named_parameters():
        writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), at)
        if p.grad is not None:
            writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), at)
    if probs is None:
        return
    n_classes = len(class_names)
    truth = truth.cpu().numpy()
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (truth, preds.cpu().numpy()), 1)
    writer.add_image("val/confusion_matrix", confusion_image(matrix, class_names), at, dataformats="HWC")
    probs = probs.cpu()
    for c, name in enumerate(class_names):
        writer.add_pr_curve(f"val_pr/{name}", torch.from_numpy(truth == c), probs[:, c], at)


def add_hparams(writer, config, metrics):
    """The run's scalar settings against its final metrics, for TensorBoard's hparams table."""
    hparams = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
    writer.add_hparams(hparams, {"hparam/val_loss": metrics["val_loss"],
                                 "hparam/val_accuracy": metrics["val_accuracy"],
                                 "hparam/train_loss": metrics["train_loss"]}, run_name="hparams")
