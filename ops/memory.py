"""Where values come from (realised buffers, constants, ranges, random numbers) and the one op
that writes: `assign`, which puts a value into a slice of a tensor, so that a KV cache can live
in one preallocated buffer.

For sources, `arg` is (payload, shape, dtype), so their shape and dtype are part of what they are.
"""
import numpy as np

from ops import dtypes
from ops.movement import region_shape, slices_of
from ops.registry import define


def _source_infer(srcs, arg):
    _payload, shape, dtype = arg
    return shape, dtype


def _randn(xs, arg, shape, dtype):
    # one seed -> one stream, whatever the backend: random numbers are part of the meaning
    return np.random.default_rng(arg[0]).standard_normal(shape, dtype=np.float32)


def _arange(xs, arg, shape, dtype):
    start, step = arg[0]
    return start + step * np.arange(shape[0], dtype=np.float64 if dtype.is_float else np.int64)


define("const", _source_infer, lambda xs, arg, shape, dtype: np.full(shape, arg[0]))
define("arange", _source_infer, _arange)
define("randn", _source_infer, _randn)
define("empty", _source_infer, lambda xs, arg, shape, dtype: np.empty(shape, dtype.storage),
       computes=False)


def _assign_infer(srcs, spec):
    target, value = srcs
    region = region_shape(target, spec)
    if value.shape != region or value.dtype != target.dtype:
        raise ValueError(f"assign: value of shape {value.shape} ({value.dtype}) does not fit "
                         f"region {region} ({target.dtype}) of shape {target.shape}")
    return target.shape, target.dtype


def _assign_reference(xs, spec, shape, dtype):
    # The meaning is pure: a copy of target with the region replaced. Backends write in place
    # when the target's storage belongs to it alone (see the realize step).
    out = np.array(xs[0], copy=True)
    out[slices_of(spec)] = xs[1]
    return out


define("assign", _assign_infer, _assign_reference, computes=False)
