"""Argument checks shared by every entry point, with PyTorch's exception types and messages.

Each check lives here once: ``functional.py`` (cross_entropy, linear_cross_entropy) and
``parallel.py`` call these, so a message cannot drift between them. Where torch_xent mirrors
``torch.nn.functional``, the type and the text are PyTorch's (docs/semantics.md lists them).
"""

from __future__ import annotations

import torch

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

# PyTorch's names for dtypes in its messages ("expected ... but got Int").
_TYPE_NAMES = {torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.bool: "Bool",
               torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
               torch.bfloat16: "BFloat16", torch.int64: "Long", torch.uint8: "Byte"}
CLASS_TARGET_DTYPES = (torch.int64, torch.uint8)


def type_name(dtype: torch.dtype) -> str:
    return _TYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


def check_label_smoothing(label_smoothing) -> float:
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:  # PyTorch silently treats < 0 as 0: we reject it
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    return eps


def check_softcap(softcap) -> float | None:
    if softcap is None:
        return None
    cap = float(softcap)
    # inf would make tanh(z / inf) = 0 and the chain-rule factor 1: reject it rather than guess.
    if not 0.0 < cap < float("inf"):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap}")
    return cap


def check_chunk_size(chunk_size) -> int | None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def check_tensor(t, what: str, fn: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}(): {what} must be a Tensor, not {type(t).__name__}")


def check_floating(t: torch.Tensor, fn: str) -> None:
    if not t.dtype.is_floating_point:
        raise NotImplementedError(f"torch_xent.{fn}: logits must be floating point "
                                  f"(float16, bfloat16, float32 or float64), not '{type_name(t.dtype)}'")


def check_same_device(t: torch.Tensor | None, name: str, input: torch.Tensor) -> None:
    if t is not None and t.device != input.device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found {name} on {t.device} "
                           f"and input on {input.device}")


def check_class_target_dtype(target: torch.Tensor) -> None:
    if target.dtype not in CLASS_TARGET_DTYPES:
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {type_name(target.dtype)}")


def check_soft_target(target: torch.Tensor, ignore_index: int) -> None:
    if not target.dtype.is_floating_point:
        raise RuntimeError(f"Expected floating point type for target with class probabilities, "
                           f"got {type_name(target.dtype)}")
    if ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")


def check_weight(weight, input: torch.Tensor, num_classes: int):
    """Returns the class weights contiguous (or None); PyTorch's errors for a wrong shape, dtype or device."""
    if weight is None:
        return None
    if weight.dim() != 1 or weight.numel() != num_classes:
        raise RuntimeError(f"weight tensor should be defined either for all {num_classes} classes or no classes "
                           f"but got weight tensor of shape: {list(weight.shape)}")
    if weight.dtype != input.dtype:
        raise RuntimeError(f"expected scalar type {type_name(input.dtype)} but found {type_name(weight.dtype)}")
    check_same_device(weight, "weight", input)
    return weight.contiguous()


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def check_targets_in_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """PyTorch's IndexError for a class index outside [0, C) that is not ignore_index.

    In eager mode it reads one value on the host (a synchronisation on CUDA, so callers do it only
    where that is acceptable). Under torch.compile a host decision cannot be traced: the check
    becomes an asynchronous assertion in the graph, which raises ``RuntimeError`` with
    ``OUT_OF_BOUNDS_UNDER_COMPILE`` when the graph runs (a device-side assert on CUDA).
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if _is_compiling():
        torch._assert_async(torch.logical_not(bad.any()), OUT_OF_BOUNDS_UNDER_COMPILE)
        return
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


OUT_OF_BOUNDS_UNDER_COMPILE = ("torch_xent: a target is out of bounds (a class index outside [0, C) that is not "
                               "ignore_index); under torch.compile the value is not named")


def check_logits(input, fn: str = "cross_entropy") -> None:
    check_tensor(input, "input", fn)
    check_floating(input, fn)


def check_targets(input: torch.Tensor, target, ignore_index: int) -> bool:
    """Shapes and dtypes of ``F.cross_entropy``'s (input, target), with PyTorch's messages.

    Returns True for class probabilities (a target of the input's shape), False for class indices.
    """
    check_tensor(target, "target", "cross_entropy")
    if input.dim() == 0:
        raise ValueError("cross_entropy: input must have at least one dimension (the classes), got a 0-d tensor")
    check_same_device(target, "target", input)
    soft = tuple(target.shape) == tuple(input.shape)
    if soft:
        check_soft_target(target, ignore_index)
    else:
        check_class_target_dtype(target)
        if input.dim() <= 2 and target.dim() != input.dim() - 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if input.dim() == 2 and target.shape[0] != input.shape[0]:
            raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                             f"({target.shape[0]}).")
        if input.dim() > 2:
            expected = [input.shape[0], *input.shape[2:]]
            if list(target.shape) != expected:
                raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
    if input.shape[0 if input.dim() == 1 else 1] == 0:
        raise IndexError("torch_xent.cross_entropy: the input has 0 classes (its class dimension is empty)")
    return soft


def check_linear_args(input, linear_weight, target, linear_bias) -> None:
    """linear_cross_entropy's (input (..., D), linear_weight (V, D), target (...), linear_bias (V,))."""
    fn = "linear_cross_entropy"
    check_logits(input, fn)
    if not isinstance(linear_weight, torch.Tensor) or linear_weight.dim() != 2:
        shape = list(linear_weight.shape) if isinstance(linear_weight, torch.Tensor) else type(linear_weight)
        raise ValueError(f"{fn}: linear_weight must be a 2-D (num_classes, in_features) tensor, got {shape}")
    if input.dim() == 0:
        raise ValueError(f"{fn}: input must have at least one dimension (the features), got a 0-d tensor")
    num_classes, in_features = linear_weight.shape
    if input.shape[-1] != in_features:
        raise ValueError(f"{fn}: input has {input.shape[-1]} features in its last dimension but "
                         f"linear_weight {list(linear_weight.shape)} expects {in_features}")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(f"{fn}: {name} has dtype {type_name(t.dtype)} but input has "
                               f"{type_name(input.dtype)}; they must match")
        check_same_device(t, name, input)
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes,):
        raise ValueError(f"{fn}: linear_bias must have shape ({num_classes},), got {list(linear_bias.shape)}")
    check_tensor(target, "target", fn)
    if target.dtype.is_floating_point:
        raise RuntimeError(f"{fn}: only class-index targets (int64 or uint8) are supported, got a "
                           f"{type_name(target.dtype)} target; use torch_xent.cross_entropy(F.linear(...), "
                           "probabilities) for class probabilities")
    check_class_target_dtype(target)
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{fn}: target shape {list(target.shape)} must be the input's shape without its last "
                         f"(feature) dimension, {list(input.shape[:-1])}")
    check_same_device(target, "target", input)
    if num_classes == 0:
        raise IndexError(f"{fn}: linear_weight has 0 rows (no classes)")
