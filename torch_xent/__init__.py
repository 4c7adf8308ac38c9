"""torch_xent: a fused softmax cross-entropy for PyTorch, a drop-in for ``F.cross_entropy``."""

from torch_xent._config import show_config
from torch_xent._native import cuda_version, empty_cache, native_available, set_gradient_cache
from torch_xent._options import LossOptions, loss_options
from torch_xent.autograd import SoftmaxCrossEntropyFunction
from torch_xent import parallel
from torch_xent.functional import cross_entropy, cross_entropy_with_lse, linear_cross_entropy
from torch_xent.linear import LinearCrossEntropyFunction
from torch_xent.modules import CrossEntropyLoss, LinearCrossEntropyLoss

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss",
    "LinearCrossEntropyFunction",
    "LinearCrossEntropyLoss",
    "LossOptions",
    "SoftmaxCrossEntropyFunction",
    "cross_entropy",
    "cross_entropy_with_lse",
    "cuda_version",
    "empty_cache",
    "linear_cross_entropy",
    "loss_options",
    "native_available",
    "parallel",
    "set_gradient_cache",
    "show_config",
]
