"""nn.Module wrappers: thin, with the same constructor arguments as nn.CrossEntropyLoss."""

from __future__ import annotations

import torch
from torch import nn

from torch_xent.functional import cross_entropy


class CrossEntropyLoss(nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` backed by :func:`torch_xent.cross_entropy`.

    ``forward(input, target)`` takes the shapes that :func:`torch_xent.cross_entropy` documents.
    """

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0,
                 softcap=None, inplace_backward=False, impl="auto"):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.impl = impl

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                             softcap=self.softcap, inplace_backward=self.inplace_backward, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"inplace_backward={self.inplace_backward}, impl={self.impl!r}")
