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


def _assign_at_infer(srcs, axis):
    target, value, start = srcs
    if start.dtype.is_float or start.dtype == dtypes.bool_ or start.shape not in ((), (1,)):
        raise ValueError(f"assign_at: start must be one integer, got {start.shape} {start.dtype}")
    rest = [n for i, n in enumerate(target.shape) if i != axis]
    if len(value.shape) != len(target.shape) or [n for i, n in enumerate(value.shape) if i != axis] != rest \
            or value.dtype != target.dtype or value.shape[axis] > target.shape[axis]:
        raise ValueError(f"assign_at: value of shape {value.shape} ({value.dtype}) does not fit along axis "
                         f"{axis} of {target.shape} ({target.dtype})")
    return target.shape, target.dtype


def region_at(arrays, axis):
    """The region assign_at writes: value's extent along `axis`, from the start tensor's value."""
    start = int(np.asarray(arrays[2]).reshape(-1)[0])
    return (slice(None),) * axis + (slice(start, start + arrays[1].shape[axis]),)


def _assign_at_reference(xs, axis, shape, dtype):
    out = np.array(xs[0], copy=True)
    out[region_at(xs, axis)] = xs[1]
    return out


# assign_at: like assign, but where the block starts along `axis` is a runtime value (a tensor),
# so one captured graph writes a KV cache at every position
define("assign_at", _assign_at_infer, _assign_at_reference, computes=False)


def write_in_place(op: str, arg, arrays) -> None:
    """What a backend does for a planned in-place assign/assign_at: arrays = target, value[, start]."""
    arrays[0][region_at(arrays, arg) if op == "assign_at" else slices_of(arg)] = arrays[1]
