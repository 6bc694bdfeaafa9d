"""Collectives: values combined across the processes one model is split over (tensor
parallelism). `arg` is the group (tinytensor.distributed): any object with `size`,
`allreduce(array)` and `allgather(array, axis)`. With one process both are the identity, which
is their whole meaning there; with more, every process must reach them in the same order (the
graph's data dependencies fix that order: each one feeds the next layer)."""
from ops.registry import define


def _same_infer(srcs, group):
    (x,) = srcs
    if not x.dtype.is_float:
        raise ValueError(f"allreduce sums float activations, got {x.dtype.name}")
    return x.shape, x.dtype


def _allreduce(xs, group, shape, dtype):
    """The element-wise sum of every process's x (float32, as activations are summed)."""
    return group.allreduce(xs[0])


def _gather_infer(srcs, arg):
    (x,), (group, axis) = srcs, arg
    if not 0 <= axis < len(x.shape):
        raise ValueError(f"allgather: axis {axis} out of range for shape {x.shape}")
    shape = list(x.shape)
    shape[axis] *= group.size
    return tuple(shape), x.dtype


def _allgather(xs, arg, shape, dtype):
    """Every process's x, concatenated along `axis` in rank order."""
    group, axis = arg
    return group.allgather(xs[0], axis)


define("allreduce", _same_infer, _allreduce)
define("allgather", _gather_infer, _allgather)
