"""Ops that move or select elements without computing on them. They work on storage bits, so a
bfloat16 tensor moves as its uint16 words."""
import math

import numpy as np

from ops import dtypes
from ops.registry import define, shape_str

# The ops that only re-view their input's buffer (no copy).
VIEWS = ("reshape", "permute", "expand", "shrink")


def _reshape_infer(srcs, shape):
    (x,) = srcs
    if math.prod(shape) != math.prod(x.shape) or any(n < 0 for n in shape):
        raise ValueError(f"reshape: cannot view shape {x.shape} as {shape}")
    return shape, x.dtype


def _permute_infer(srcs, order):
    (x,) = srcs
    if sorted(order) != list(range(len(x.shape))):
        raise ValueError(f"permute: {order} is not an order of the axes of shape {x.shape}")
    return tuple(x.shape[i] for i in order), x.dtype


def _expand_infer(srcs, shape):
    (x,) = srcs
    if len(shape) != len(x.shape) or any(a != b and a != 1 for a, b in zip(x.shape, shape)):
        raise ValueError(f"expand: cannot broadcast shape {x.shape} to {shape}")
    return shape, x.dtype


def slices_of(spec):
    # (start, stop, step) as range() reads them; a negative stop means "past the front"
    return tuple(slice(a, b if b >= 0 else None, c) for a, b, c in spec)


def region_shape(x, spec):
    """The shape of the region that `spec` ((start, stop, step) per axis) selects from x."""
    if len(spec) != len(x.shape):
        raise ValueError(f"slice: {len(spec)} ranges for shape {x.shape}")
    for (a, b, c), n in zip(spec, x.shape):
        if c == 0 or not (0 <= a <= n and -1 <= b <= n):
            raise ValueError(f"slice: range {(a, b, c)} out of bounds for shape {x.shape}")
    return tuple(len(range(a, b, c)) for a, b, c in spec)


def _pad_infer(srcs, arg):
    (x,), (pads, _value) = srcs, arg
    if len(pads) != len(x.shape) or any(p < 0 for pair in pads for p in pair):
        raise ValueError(f"pad: pads {pads} invalid for shape {x.shape}")
    return tuple(n + a + b for n, (a, b) in zip(x.shape, pads)), x.dtype


def _pad_reference(xs, arg, shape, dtype):
    pads, value = arg
    fill = dtypes.narrow(np.array(value, dtype=np.float32 if dtype.is_float else np.int64), dtype)
    return np.pad(xs[0], pads, constant_values=fill)


def _cat_infer(srcs, axis):
    first = srcs[0]
    for s in srcs:
        rest_ok = len(s.shape) == len(first.shape) and all(
            a == b for i, (a, b) in enumerate(zip(s.shape, first.shape)) if i != axis)
        if not rest_ok or s.dtype != first.dtype:
            raise ValueError(f"cat: shapes {shape_str(*(t.shape for t in srcs))} "
                             f"(dtypes {[t.dtype for t in srcs]}) do not join along axis {axis}")
    shape = list(first.shape)
    shape[axis] = sum(s.shape[axis] for s in srcs)
    return tuple(shape), first.dtype


def _gather_infer(srcs, axis):
    x, index = srcs
    if index.dtype.is_float or index.dtype == dtypes.bool_:
        raise ValueError(f"gather: index must be an integer tensor, got {index.dtype}")
    return x.shape[:axis] + index.shape + x.shape[axis + 1:], x.dtype


define("reshape", _reshape_infer, lambda xs, shape, *_: np.reshape(xs[0], shape), computes=False)
define("permute", _permute_infer, lambda xs, order, *_: np.transpose(xs[0], order), computes=False)
define("expand", _expand_infer, lambda xs, shape, *_: np.broadcast_to(xs[0], shape), computes=False)
define("shrink", lambda srcs, spec: (region_shape(srcs[0], spec), srcs[0].dtype),
       lambda xs, spec, *_: xs[0][slices_of(spec)], computes=False)
define("pad", _pad_infer, _pad_reference, computes=False)
define("cat", _cat_infer, lambda xs, axis, *_: np.concatenate(xs, axis=axis), computes=False)
# gather: index values lie in [-n, n) along `axis`; this is embedding lookup and x[index]
define("gather", _gather_infer, lambda xs, axis, *_: np.take(xs[0], xs[1], axis=axis), computes=False)
# contiguous: a fresh buffer holding the same values, in row-major order
define("contiguous", lambda srcs, arg: (srcs[0].shape, srcs[0].dtype),
       lambda xs, *_: np.array(xs[0], copy=True, order="C"), computes=False)
