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
        usable = device == "cpu" or torch.cuda.is_available()
        if built:
            used = "native kernel" if usable else "native kernel (no GPU visible now)"
        else:
            used = "reference (pure PyTorch)"
        threads = ""
        if built and device == "cpu":
            threads = (f" ({_native.cpu_kernel_variant()}, rows in parallel on {_native.cpu_parallel_threads()} of "
                       f"{torch.get_num_threads()} threads)")
        lines.append(f"  {device}: kernel {'built' if built else 'not built'}{threads}; impl='auto' uses the {used}")
    text = "\n".join(lines)
    print(text, file=file)
    return text
