"""Loads the compiled ops when they were built, registers their fake kernels and autograd formulas,
and says what is available. Importing this module never fails because the extension is missing."""

from __future__ import annotations

import importlib.util
import os

import torch

from torch_xent.reference import acc_dtype

IMPLS = ("auto", "native", "aten", "reference")

_LOAD_ERROR: str | None = None
_C = None
if importlib.util.find_spec("torch_xent._C") is None:
    _LOAD_ERROR = "the extension was not built: a pure-Python install"
else:
    try:  # the extension registers torch.ops.torch_xent.* as a side effect of being loaded
        from torch_xent import _C
    except Exception as exc:  # noqa: BLE001 - e.g. built against another torch: use the reference
        _LOAD_ERROR = f"the extension failed to load ({type(exc).__name__}: {exc})"

OPS = ("cross_entropy_forward", "cross_entropy_forward_inplace", "cross_entropy_backward")


def loaded() -> bool:
    return _C is not None


def load_error() -> str | None:
    return _LOAD_ERROR


def _has_kernel(op: str, dispatch_key: str) -> bool:
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"torch_xent::{op}", dispatch_key)
    except RuntimeError:
        return False


# Which devices have a compiled kernel: decided once, at import. A lookup here must never run inside
# a region that torch.compile traces (the first torch_xent call of a process may be one), and the
# answer cannot change while the process runs.
_AVAILABLE = {dev: _has_kernel("cross_entropy_forward", key) for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def native_available(device="cpu") -> bool:
    """True when the compiled kernel for ``device`` (a torch.device, or a string such as "cuda") is built."""
    dev_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _AVAILABLE.get(dev_type, False)


#: Whether the compiled CUDA kernel has passed the GPU test suite (tests/test_cuda.py and the CUDA
#: cases of the other test files) on real hardware. Until it has, impl="auto" runs the pure-PyTorch
#: path on CUDA and the kernel is used only when asked for (impl="native"). The GPU validation flips
#: this one line, with the run's record next to it: none yet (docs/cuda.md, "Validating on a GPU").
CUDA_KERNEL_VALIDATED = False


def kernel_validated(device_type: str) -> bool:
    """Whether the compiled kernel for ``device_type`` has passed its tests on that hardware (the CPU
    kernel's run in CI on every build)."""
    return device_type == "cpu" or (device_type == "cuda" and CUDA_KERNEL_VALIDATED)


def select_kernel(impl: str, device_type: str, built: bool, validated: bool, missing: str = "") -> tuple:
    """Which implementation runs, and why: a function of what was built and validated only.

    Returns ``(kernel, reason)`` with kernel "native" (the compiled op), "aten" (the fast pure-PyTorch
    path, ``torch_xent/aten.py``) or "reference" (the readable pure-PyTorch statement,
    ``torch_xent/reference.py``). ``impl="auto"`` takes the compiled kernel only when it is built and
    validated; ``impl="native"`` without one raises (``missing`` says why it is absent).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return "reference", "impl='reference' asked for"
    if impl == "aten":
        return "aten", "impl='aten' asked for"
    if impl == "native":
        if not built:
            why = missing or f"it was built without {device_type.upper()} kernels"
            raise RuntimeError(f"torch_xent: impl='native' asked for, but no compiled kernel for {device_type} "
                               f"is available ({why}); see torch_xent.show_config()")
        return "native", "impl='native' asked for" + ("" if validated else " (the kernel is not validated)")
    if built and validated:
        return "native", "the compiled kernel is built and validated"
    if built:
        return "aten", (f"the compiled {device_type.upper()} kernel is built but not yet validated on this kind "
                        "of hardware (impl='native' selects it)")
    return "aten", f"no compiled kernel for {device_type}" + (f" ({missing})" if missing else "")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation (see :func:`select_kernel`) that runs for ``device`` under the ``impl`` argument.
    Nothing is cached: a dict filled on the first call would change under a torch.compile trace."""
    # select_kernel's answers where they need no lookup: an explicit pure-PyTorch path, and the CPU
    # (whose kernel is validated) for "auto", or for "native" when it is built.
    if impl == "aten" or impl == "reference":
        return impl
    if device.type == "cpu" and (impl == "auto" or (impl == "native" and _AVAILABLE["cpu"])):
        return "native" if _AVAILABLE["cpu"] else "aten"
    return select_kernel(impl, device.type, native_available(device), kernel_validated(device.type),
                         load_error() or "")[0]


def cuda_version() -> int:
    """CUDA version the extension was compiled with (100 * major + minor), -1 for a CPU-only build."""
    if _C is None:
        return -1
    return int(torch.ops.torch_xent.cuda_version())


def cpu_parallel_threads(tasks=None) -> int:
    """Threads the CPU kernel's row loop really runs on for ``tasks`` rows (default: one per thread
    torch uses); 1 if the extension was built without OpenMP, 0 without the extension."""
    if _C is None:
        return 0
    return int(torch.ops.torch_xent.cpu_parallel_threads(torch.get_num_threads() if tasks is None else tasks))


def cpu_kernel_variant() -> str:
    """The instruction-set variant of the CPU kernel this process runs: "DEFAULT", "AVX2", "AVX512" or
    "AVX512_BF16" (AVX512 with one-instruction bfloat16 stores); "" without the extension."""
    if _C is None:
        return ""
    return str(torch.ops.torch_xent.cpu_kernel_variant())


def set_gradient_cache(enabled: bool) -> None:
    """Turns the CPU kernel's reuse of idle gradient buffers on (the default) or off.

    The compiled CPU op allocates its gradient buffers of 4 MiB or more from a small pool: when a
    gradient's storage is destroyed (its last tensor, view, ``.grad``, storage object or saved
    variable gone) the memory returns to the pool, which keeps the last two such buffers, and a later
    call of the same size writes its gradient there instead of into fresh memory, whose first touch
    costs a page fault per page. The pool holds no reference to a buffer in use. Turning it off also
    frees the idle buffers. ``TORCH_XENT_GRADIENT_CACHE=0`` (or false/off/no) turns it off at import."""
    if _C is None:
        return
    torch.ops.torch_xent.cpu_set_gradient_cache(bool(enabled))
    if not enabled:
        torch.ops.torch_xent.cpu_release_gradient_cache()


def gradient_cache_enabled() -> bool:
    """Whether the CPU kernel reuses idle gradient buffers (False without the extension)."""
    return _C is not None and bool(torch.ops.torch_xent.cpu_gradient_cache_enabled())


def empty_cache() -> int:
    """Frees the idle gradient buffers the CPU kernel keeps for reuse; returns how many bytes that
    released (buffers still in use are freed by their last user as usual)."""
    if _C is None:
        return 0
    return int(torch.ops.torch_xent.cpu_release_gradient_cache())


def gradient_cache_bytes() -> int:
    """Bytes of idle gradient buffers the CPU kernel holds for reuse right now."""
    if _C is None:
        return 0
    return int(torch.ops.torch_xent.cpu_gradient_cache_bytes())


if _C is not None and os.environ.get("TORCH_XENT_GRADIENT_CACHE", "1").strip().lower() in ("0", "false", "off", "no"):
    set_gradient_cache(False)


if _C is not None:
    _lib_ops = torch.ops.torch_xent

    def _row_shape(logits):
        # (M, C) logits have (M,) rows; (N, C, S) logits (K-dim input in its own layout) (N, S).
        return (logits.shape[0],) if logits.dim() == 2 else (logits.shape[0], logits.shape[2])

    def _lse_shape(logits, need_lse):
        # (N, C, S) logits skip the lse nobody will read (CPU and CUDA kernels); rows return it.
        return (0,) if not need_lse and logits.dim() == 3 else _row_shape(logits)

    @torch.library.register_fake("torch_xent::cross_entropy_forward")
    def _forward_fake(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap,
                      compute_grad, need_lse=True):
        acc = acc_dtype(logits.dtype)
        rows = _row_shape(logits)
        loss = logits.new_empty(rows if reduction == 0 else (), dtype=acc)
        lse = logits.new_empty(_lse_shape(logits, need_lse), dtype=acc)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad \
            else logits.new_empty((0,))
        return loss, lse, grad

    @torch.library.register_fake("torch_xent::cross_entropy_forward_inplace")
    def _forward_inplace_fake(logits, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                              softcap, need_lse=True):
        acc = acc_dtype(logits.dtype)
        rows = _row_shape(logits)
        loss = logits.new_empty(rows if reduction == 0 else (), dtype=acc)
        lse = logits.new_empty(_lse_shape(logits, need_lse), dtype=acc)
        return loss, lse

    @torch.library.register_fake("torch_xent::cross_entropy_backward")
    def _backward_fake(grad, grad_output):
        return torch.empty_like(grad)

    # Autograd for calling the forward op directly (torch_xent.cross_entropy goes through
    # SoftmaxCrossEntropyFunction instead, which also gives double backward): the op already
    # computed d loss / d logits, so the backward only scales it.
    def _forward_setup_context(ctx, inputs, output):
        ctx.reduction = inputs[3]
        ctx.save_for_backward(output[2])

    def _forward_backward(ctx, grad_loss, grad_lse, grad_grad):
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0 and grad_loss is not None:
            raise RuntimeError("torch_xent::cross_entropy_forward: backward needs compute_grad=True")
        g = None if grad_loss is None else _lib_ops.cross_entropy_backward(grad, grad_loss)
        return g, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd("torch_xent::cross_entropy_forward", _forward_backward,
                                    setup_context=_forward_setup_context)

    def _backward_setup_context(ctx, inputs, output):
        grad, grad_output = inputs
        ctx.save_for_backward(grad, grad_output)

    def _backward_backward(ctx, gg):
        grad, grad_output = ctx.saved_tensors
        d_grad = _lib_ops.cross_entropy_backward(gg, grad_output) if ctx.needs_input_grad[0] else None
        d_go = None
        if ctx.needs_input_grad[1]:
            prod = (gg * grad).to(grad_output.dtype)
            d_go = prod.sum(dim=1) if grad_output.dim() > 0 else prod.sum()
        return d_grad, d_go

    torch.library.register_autograd("torch_xent::cross_entropy_backward", _backward_backward,
                                    setup_context=_backward_setup_context)
