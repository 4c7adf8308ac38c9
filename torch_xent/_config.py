"""What was built and what is used: native_available() and show_config()."""

from __future__ import annotations

import torch

from torch_xent import _native


def show_config(file=None) -> str:
    """Prints (and returns) which kernels are built, which `impl="auto"` uses, and why."""
    lines = [f"torch_xent, torch {torch.__version__}"]
    if _native.loaded():
        cuda = _native.cuda_version()
        lines.append("  compiled extension: loaded" + (f" (CUDA {cuda // 100}.{cuda % 100})" if cuda > 0 else
                                                       " (CPU only)"))
    else:
        lines.append(f"  compiled extension: not loaded ({_native.load_error()})")
    for device in ("cpu", "cuda"):
        built = _native.native_available(device)
        threads = ""
        if built and device == "cpu":
            threads = (f" ({_native.cpu_kernel_variant()}, rows in parallel on {_native.cpu_parallel_threads()} of "
                       f"{torch.get_num_threads()} threads)")
        visible = device == "cpu" or torch.cuda.is_available()
        lines.append(describe_device(device, built, _native.kernel_validated(device), visible, threads))
    if _native.loaded():
        held = _native.gradient_cache_bytes() / 2**20
        lines.append("  cpu gradient buffers: " + (f"reused across calls ({held:.1f} MiB idle now)"
                                                   if _native.gradient_cache_enabled() else
                                                   "fresh each call (set_gradient_cache(False))"))
    lines.append("  any other device: impl='auto' uses the pure-PyTorch path (aten)")
    text = "\n".join(lines)
    print(text, file=file)
    return text


def describe_device(device: str, built: bool, validated: bool, visible: bool, threads: str = "") -> str:
    """show_config()'s line for one device type: what is built, what impl='auto' runs there and why."""
    kernel, why = _native.select_kernel("auto", device, built, validated)
    used = "the native kernel" if kernel == "native" else "the pure-PyTorch path (aten)"
    if kernel == "native" and not visible:
        used += " (no GPU visible now)"
    state = "built" if built else "not built"
    if built and not validated:
        state += ", not validated"
    return f"  {device}: kernel {state}{threads}; impl='auto' uses {used}: {why}"
