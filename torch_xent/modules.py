"""nn.Module wrappers: thin, holding the loss options (and class weights as a buffer)."""

from __future__ import annotations

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
    """Module form of :func:`torch_xent.linear_cross_entropy`; it holds the loss options (and the class
    weights as a buffer), not the classifier: ``forward(input, linear_weight, target,
    linear_bias=None)`` takes the weight (and bias) of the model's own ``nn.Linear``, so the
    parameters stay where the model, its optimiser and its state dict expect them.
    """

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0,
                 softcap=None, chunk_size=None, impl="auto"):
        super().__init__(weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                         z_loss=z_loss, softcap=softcap, chunk_size=chunk_size, impl=impl)

    def forward(self, input, linear_weight, target, linear_bias=None):
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                    **self._options())
