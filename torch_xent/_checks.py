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


def is_compiling() -> bool:
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
    if is_compiling():
        torch._assert_async(torch.logical_not(bad.any()), OUT_OF_BOUNDS_UNDER_COMPILE)
        return
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


OUT_OF_BOUNDS_UNDER_COMPILE = ("torch_xent: a target is out of bounds (a class index outside [0, C) that is not "
                               "ignore_index); under torch.compile the value is not named")


def check_logits(input, fn: str = "cross_entropy") -> None:
    check_tensor(input, "input", fn)
    check_floating(input, fn)


def check_targets(input: torch.Tensor, target, ignore_index: int, shape=None) -> bool:
    """Shapes and dtypes of ``F.cross_entropy``'s (input, target), in PyTorch's order and with its messages.

    ``shape`` stands for the input's shape where the logits do not exist (linear_cross_entropy).
    Returns True for class probabilities (a target of the input's shape), False for class indices.
    """
    check_tensor(target, "target", "cross_entropy")
    shape = tuple(input.shape) if shape is None else tuple(shape)
    dims = len(shape)
    if dims == 0:
        raise ValueError("cross_entropy: input must have at least one dimension (the classes), got a 0-d tensor")
    check_same_device(target, "target", input)
    soft = tuple(target.shape) == shape
    if soft:
        check_soft_target(target, ignore_index)
    else:
        if dims >= 2 and target.dim() >= 1 and target.shape[0] != shape[0]:
            raise ValueError(f"Expected input batch_size ({shape[0]}) to match target batch_size "
                             f"({target.shape[0]}).")
        if dims == 1 and target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
        if dims <= 2 and target.dim() != dims - 1 and not (dims == 1 and target.dim() == 1):
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if dims > 2 and list(target.shape) != [shape[0], *shape[2:]]:
            raise RuntimeError(f"Expected target size {[shape[0], *shape[2:]]}, got {list(target.shape)}")
        check_class_target_dtype(target)
    if shape[0 if dims == 1 else 1] == 0:
        raise IndexError("torch_xent.cross_entropy: the input has 0 classes (its class dimension is empty)")
    return soft


def check_linear_args(input, linear_weight, target, linear_bias, ignore_index):
    """``F.linear_cross_entropy``'s checks, in its order and with its messages, then dtypes and devices.

    Returns (num_classes, out_features, logits_shape): the logits that F.linear would make have
    ``logits_shape`` = (*input.shape[:-1], num_classes, *out_features).
    """
    fn = "linear_cross_entropy"
    for what, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        check_tensor(t, what, fn)
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    in_features = input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError("expected equal input and linear_weight last dimensions (in_features), "
                           f"got {in_features} and {linear_weight.shape[-1]}, respectively")
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(f"expected linear_bias shape {(num_classes, *out_features)}, got {tuple(linear_bias.shape)}")
    if out_features and input.dim() == 1:
        raise RuntimeError(f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
                           f" batched input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}")
    logits_shape = (*input.shape[:-1], num_classes, *out_features)
    if tuple(target.shape) == logits_shape and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    check_floating(input, fn)
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(f"{fn}: {name} has dtype {type_name(t.dtype)} but input has "
                               f"{type_name(input.dtype)}; they must match")
        check_same_device(t, name, input)
    return num_classes, out_features, logits_shape
