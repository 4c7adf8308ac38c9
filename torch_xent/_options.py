"""The loss options, built and checked once per call and handed down by name.

A ``NamedTuple`` rather than a dataclass: it is immutable, hashable, and torch.compile treats it as
a tuple of constants when it is passed to an ``autograd.Function``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from torch_xent import _checks


class LossOptions(NamedTuple):
    """What every implementation needs to know about the loss besides the tensors.

    - reduction: "none" | "mean" | "sum"
    - ignore_index: class index whose rows count for nothing (class-index targets)
    - label_smoothing: in [0, 1]
    - z_loss: coefficient of lse**2 per counted row (0: off)
    - softcap: logits replaced by softcap * tanh(logits / softcap) first (None: off)
    """

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None

    @property
    def reduction_code(self) -> int:
        """The reduction as the compiled ops take it (0 none, 1 mean, 2 sum)."""
        return _checks.REDUCTIONS[self.reduction]

    @property
    def softcap_value(self) -> float:
        """softcap as the compiled ops take it: 0.0 for off."""
        return 0.0 if self.softcap is None else self.softcap

    def replace(self, **changes) -> "LossOptions":
        return self._replace(**changes)


def loss_options(reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None) -> LossOptions:
    """Checks the options (PyTorch's messages) and returns them normalised to Python scalars.

    A training loop passes the same options on every call: the checked result is remembered per
    argument values and types (a few microseconds of a small problem's loss) when they are plain
    Python scalars; anything else (a tensor, a NumPy number) and invalid values are checked on
    every call, and so is every call under torch.compile (which warns about memoised functions)."""
    plain = _PLAIN
    if (not _checks.is_compiling() and type(reduction) in plain and type(ignore_index) in plain
            and type(label_smoothing) in plain and type(z_loss) in plain and type(softcap) in plain):
        return _checked_options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    return _check_options(reduction, ignore_index, label_smoothing, z_loss, softcap)


def _check_options(reduction, ignore_index, label_smoothing, z_loss, softcap) -> LossOptions:
    _checks.check_reduction(reduction)
    return LossOptions(reduction=reduction, ignore_index=int(ignore_index),
                       label_smoothing=_checks.check_label_smoothing(label_smoothing), z_loss=float(z_loss),
                       softcap=_checks.check_softcap(softcap))


# Exceptions are not remembered: an invalid option raises on every call.
_PLAIN = frozenset((str, int, float, bool, type(None)))
_checked_options = functools.lru_cache(maxsize=64, typed=True)(_check_options)
