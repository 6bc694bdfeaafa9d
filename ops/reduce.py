"""Reductions. `arg` is the tuple of reduced axes; the reduced axes stay as size 1 (the Tensor
layer drops them with a reshape when keepdim is off), so every reduction has one output form."""
import numpy as np

from ops import dtypes
from ops.registry import define


def _reduce_infer(name):
    def infer(srcs, axes):
        (x,) = srcs
        if any(not 0 <= a < len(x.shape) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"{name}: axes {axes} invalid for shape {x.shape}")
        if name != "sum" and any(x.shape[a] == 0 for a in axes):
            raise ValueError(f"{name}: cannot reduce an empty axis of shape {x.shape}")
        shape = tuple(1 if i in axes else n for i, n in enumerate(x.shape))
        return shape, dtypes.int64 if name == "argmax" else x.dtype
    return infer


# The reductions a loop kernel folds (argmax, which keeps an index, runs its NumPy meaning).
REDUCE = ("sum", "max", "min")

define("sum", _reduce_infer("sum"), lambda xs, axes, shape, dtype: np.sum(xs[0], axis=axes, keepdims=True))
define("max", _reduce_infer("max"), lambda xs, axes, shape, dtype: np.max(xs[0], axis=axes, keepdims=True))
define("min", _reduce_infer("min"), lambda xs, axes, shape, dtype: np.min(xs[0], axis=axes, keepdims=True))
# argmax reduces exactly one axis; ties go to the first index, as in NumPy and PyTorch
define("argmax", _reduce_infer("argmax"),
       lambda xs, axes, shape, dtype: np.argmax(xs[0], axis=axes[0], keepdims=True))
