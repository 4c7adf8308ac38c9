"""train.py's two step-0 diagnostics, each logged to TensorBoard at step 0 and returned as printable text:

- the worked example of docs/gradient.md (--task setosa): one Setosa through the initial model and the loss;
- --check-grad: the float64 gradient three ways (torch_xent's manual backward, finite differences, autograd
  through F.cross_entropy).

`loss_fn(logits, target, which, reduction)` is train.py's loss_and_lse: (loss, per-row lse).
"""

import copy

import numpy as np
import torch

import torch_xent

CHECK_GRAD_ROWS = 64      # --check-grad: training rows used
CHECK_GRAD_COORDS = 256   # --check-grad: parameters probed by finite differences (all if fewer)


def worked_example(model, example_x, example_w, loss_fn, impl, writer, device):
    """The worked example's numbers for `example_x` (a Setosa, class 0) through the linear `model`, which starts
    from the weights `example_w` and b = 0, and the loss `impl`. Logged under the tags seed/<name> (scalars)
    and "seed" (text), which dashboards already read."""
    m = copy.deepcopy(model).double()
    x = torch.tensor([example_x], dtype=torch.float64, device=device)
    y = torch.tensor([0], device=device)
    z = m(x)
    loss, _ = loss_fn(z, y, which=impl, reduction="sum")
    loss.backward()
    z, p = z.detach()[0].tolist(), z.detach().softmax(1)[0].tolist()
    g_w, g_b = m.weight.grad.tolist(), m.bias.grad.tolist()
    values = {"loss": loss.item(), "z_0": z[0], "z_1": z[1], "softmax_0": p[0], "softmax_1": p[1],
              "dL_db_0": g_b[0], "dL_db_1": g_b[1]}
    values |= {f"dL_dW_{i}_{j}": g_w[i][j] for i in range(2) for j in range(2)}
    for k, v in values.items():
        writer.add_scalar(f"seed/{k}", v, 0)
    fmt = lambda v: "[" + ", ".join(f"{u:.6f}" for u in v) + "]"  # noqa: E731
    lines = [f"worked example x = {example_x} (Setosa, class 0), W = {example_w}, b = 0, loss {impl}:",
             f"  z = W x + b = {fmt(z)}   softmax = {fmt(p)}   loss = -log p_0 = {loss.item():.6f}",
             f"  dL/dW = (p - onehot) x^T = [{fmt(g_w[0])}, {fmt(g_w[1])}]   dL/db = {fmt(g_b)}"]
    writer.add_text("seed", "\n".join("    " + line for line in lines), 0)
    return "\n".join(lines)


def check_gradients(model, x, y, loss_fn, impl, seed, ignore_index, writer, device):
    """Float64 gradient of the loss over the first rows of (x, y) with respect to every parameter, three ways:
    torch_xent's manual backward, central finite differences of torch_xent's forward, and autograd through
    F.cross_entropy. `impl` "torch" checks the kernel that --impl auto would pick. Returns the line to print."""
    m = copy.deepcopy(model).double()
    x, y = x[:CHECK_GRAD_ROWS].double(), y[:CHECK_GRAD_ROWS]
    if not bool((y != ignore_index).any()):
        return "check-grad: every target in the first rows is ignored; nothing to check"
    which = impl if impl != "torch" else ("native" if torch_xent.native_available(device) else "reference")
    params = list(m.parameters())

    def grads(loss):
        m.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in params])

    manual = grads(loss_fn(m(x), y, which=which, reduction="mean")[0])
    autograd = grads(loss_fn(m(x), y, which="torch", reduction="mean")[0])
    coords = [(k, j) for k, p in enumerate(params) for j in range(p.numel())]
    probe = torch.randperm(len(coords), generator=torch.Generator().manual_seed(seed))[:CHECK_GRAD_COORDS]
    offsets = np.cumsum([0] + [p.numel() for p in params])
    h, diff_fd, rel_fd = 1e-6, 0.0, 0.0
    with torch.no_grad():
        for i in probe.tolist():
            k, j = coords[i]
            flat = params[k].view(-1)
            orig = flat[j].item()
            flat[j] = orig + h
            up = loss_fn(m(x), y, which=which, reduction="mean")[0].item()
            flat[j] = orig - h
            down = loss_fn(m(x), y, which=which, reduction="mean")[0].item()
            flat[j] = orig
            fd = (up - down) / (2 * h)
            g = manual[offsets[k] + j].item()
            diff_fd = max(diff_fd, abs(g - fd))
            rel_fd = max(rel_fd, abs(g - fd) / max(abs(fd), 1e-3))
    diff_torch = (manual - autograd).abs().max().item()
    writer.add_scalar("check/max_abs_diff_fd", diff_fd, 0)
    writer.add_scalar("check/max_rel_diff_fd", rel_fd, 0)
    writer.add_scalar("check/max_abs_diff_torch", diff_torch, 0)
    return (f"check-grad (float64, {len(y)} rows, {len(probe)} of {len(coords)} parameters, loss {which}): "
            f"max |manual - finite difference| = {diff_fd:.3e} (relative {rel_fd:.3e}), "
            f"max |manual - autograd of F.cross_entropy| = {diff_torch:.3e}")
