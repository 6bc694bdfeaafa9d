"""Indexing a Tensor: a Python index (ints, slices, None, Ellipsis, one integer tensor) becomes
`shrink`, `gather` and `reshape`; writing through one becomes `assign`. These are the Tensor's
methods (tensor.py binds them), kept here with the index resolution they share."""
import numpy as np

from tinytensor.node import Node


def plan(x, index):
    """Resolve an index of tensor x into (shrink spec per axis, (tensor index, its axis) or
    None, the result's shape)."""
    tensor = type(x)
    items = list(index) if isinstance(index, tuple) else [index]
    items = [tensor(i) if isinstance(i, (list, np.ndarray)) else i for i in items]
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    ellipses = [at for at, i in enumerate(items) if i is Ellipsis]  # `in` would call Tensor ==
    if used > x.ndim or len(ellipses) > 1:
        raise IndexError(f"index {index!r} does not fit shape {x.shape}")
    fill = [slice(None)] * (x.ndim - used)
    if ellipses:
        items[ellipses[0]:ellipses[0] + 1] = fill
    else:
        items += fill
    spec, out_shape, gather, axis = [], [], None, 0
    for item in items:
        if item is None:
            out_shape.append(1)
            continue
        n = x.shape[axis]
        if isinstance(item, tensor):
            if gather is not None:
                raise IndexError("only one integer-tensor index is supported")
            gather = (item, axis)
            spec.append((0, n, 1))
            out_shape.extend(item.shape)
        elif isinstance(item, slice):
            a, b, c = item.indices(n)
            spec.append((a, b, c) if len(range(a, b, c)) else (0, 0, 1))  # one form of empty
            out_shape.append(len(range(a, b, c)))
        elif isinstance(item, (int, np.integer)):
            if not -n <= item < n:
                raise IndexError(f"index {item} out of range for axis {axis} of shape {x.shape}")
            spec.append((int(item) % n, int(item) % n + 1, 1))
        else:
            raise IndexError(f"unsupported index {item!r}")
        axis += 1
    return tuple(spec), gather, tuple(out_shape)


def getitem(x, index):
    spec, gather, out_shape = plan(x, index)
    whole = all(s == (0, n, 1) for s, n in zip(spec, x.shape))
    y = x if whole else x._op("shrink", arg=spec)
    if gather is not None:
        index_tensor, axis = gather
        y = y._op("gather", index_tensor, arg=axis)
    return y.reshape(out_shape)


def setitem(x, index, value) -> None:
    """Write `value` into the region `index` selects. Recorded like any op; when this tensor's
    buffer is its own, the backend writes into it in place (a KV cache)."""
    spec, gather, selected = plan(x, index)
    if gather is not None:
        raise IndexError("writes through an integer-tensor index are not supported")
    value = x._as_tensor(value).cast(x.dtype).broadcast_to(selected)
    region = tuple(len(range(*s)) for s in spec)
    x.node = Node("assign", (x.node, value.reshape(region).node), spec)


def assign_at(x, start, value, axis: int = 0):
    """Write `value` into this tensor along `axis`, beginning at the integer held by `start`
    (a tensor, so the position is data, not part of the graph's structure)."""
    value = x._as_tensor(value).cast(x.dtype)
    x.node = Node("assign_at", (x.node, value.node, start.node), x._axis(axis))
    return x


def assign(x, value):
    x[...] = value
    return x
