"""Matrix product over the last two axes; the batch axes in front already match (the Tensor
layer expands them), as do the dtypes."""
import numpy as np

from ops.registry import define, shape_str


def _matmul_infer(srcs, out_dtype):
    a, b = srcs
    if len(a.shape) < 2 or len(b.shape) < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: cannot multiply shapes {shape_str(a.shape, b.shape)}")
    if out_dtype is not None and a.dtype.is_float and b.dtype.is_float:
        return a.shape[:-1] + b.shape[-1:], out_dtype
    if a.dtype != b.dtype:
        raise ValueError(f"matmul: dtypes {a.dtype} and {b.dtype} differ (cast them first)")
    return a.shape[:-1] + b.shape[-1:], a.dtype


# arg: None, or the float dtype of the result when the operands are float of other widths
# (a pass folds a weight's widening cast into the product: the kernel widens in registers)
define("matmul", _matmul_infer, lambda xs, *_: np.matmul(xs[0], xs[1]))
