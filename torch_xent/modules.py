"""nn.Module wrappers: thin, holding the loss options (and class weights as a buffer)."""

from __future__ import annotations

import math

import torch
from torch import nn

from torch_xent.functional import cross_entropy, linear_cross_entropy


class _LossModule(nn.Module):
    """Holds the class weights as a buffer (so they follow ``.to()`` and the state dict) and the
    other options as plain attributes, shown by ``repr``."""

    def __init__(self, weight, **options):
        super().__init__()
        self.register_buffer("weight", weight)
        self._option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, value)

    def _options(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self._options().items())


class CrossEntropyLoss(_LossModule):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` backed by :func:`torch_xent.cross_entropy`.

    ``forward(input, target)`` takes the shapes that :func:`torch_xent.cross_entropy` documents.
    """

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0,
                 softcap=None, inplace_backward=False, impl="auto"):
        super().__init__(weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                         z_loss=z_loss, softcap=softcap, inplace_backward=inplace_backward, impl=impl)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, weight=self.weight, **self._options())


class LinearCrossEntropyLoss(_LossModule):
    """Drop-in for ``torch.nn.LinearCrossEntropyLoss``: a classifier (``self.linear``, an ``nn.Linear``
    with ``num_classes * prod(out_features)`` outputs) followed by the cross-entropy, computed by
    :func:`torch_xent.linear_cross_entropy` so that the logits never exist.

    Same constructor and errors as PyTorch's, and the same state dict (``linear.weight``,
    ``linear.bias``, ``weight``), so a state dict loads from one into the other. torch_xent adds
    ``z_loss``, ``softcap``, ``chunk_size`` and ``impl`` (keyword-only). ``forward(input, target)``
    takes ``(N, in_features)`` or ``(in_features,)`` input and the targets that
    :func:`torch_xent.linear_cross_entropy` documents.

    For a classifier weight that lives elsewhere (a language model's tied or untied head), call
    :func:`torch_xent.linear_cross_entropy` with that weight instead: it holds no state.
    """

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None, dtype=None,
                 reduction="mean", weight=None, ignore_index=None, label_smoothing=0.0, options=None, z_loss=0.0,
                 softcap=None, chunk_size=None, impl="auto"):
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight, reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         options=options, z_loss=z_loss, softcap=softcap, chunk_size=chunk_size, impl=impl)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.linear = nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                device=device, dtype=dtype)

    def forward(self, input, target):
        shape = (self.num_classes, *self.out_features)
        linear_weight = self.linear.weight.reshape(*shape, self.linear.in_features)
        linear_bias = None if self.linear.bias is None else self.linear.bias.reshape(shape)
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                    **self._options())

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, " + super().extra_repr())
