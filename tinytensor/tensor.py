"""The Tensor: a handle on a node of the lazy graph. Every method records ops; nothing is
computed until a value is asked for (`numpy`, `item`, `tolist`, `realize`).

This layer makes everything explicit that the ops leave out: broadcasting becomes `expand`,
dtype promotion becomes `cast`, negative axes and `-1` sizes are resolved, and indexing becomes
`shrink`, `gather` and `reshape`. A mistake raises here, with the shapes, at the line that made it.
"""
import math
import secrets

import numpy as np

from ops import dtypes
from ops.dtypes import DType
from tinytensor import indexing
from tinytensor.node import Node
from tinytensor.realize import realize as _realize
from tinytensor.shapes import broadcast_shape, shape_arg


def _scalar_dtype(value, like: DType) -> DType:
    """A Python number takes the tensor's dtype, unless it needs a wider kind (1.5 + int tensor)."""
    if isinstance(value, float) and not like.is_float:
        return dtypes.default_float
    if isinstance(value, int) and not isinstance(value, bool) and like == dtypes.bool_:
        return dtypes.default_int
    return like


class Tensor:
    __slots__ = ("node",)
    __hash__ = object.__hash__  # == records a comparison, so identity is the hash

    def __init__(self, data, dtype=None):
        if isinstance(data, Node):
            self.node = data
            return
        if isinstance(data, Tensor):
            self.node = data.node if dtype is None else data.cast(dtype).node
            return
        array = np.array(data)
        if array.dtype == object:
            raise TypeError(f"cannot make a tensor from {type(data).__name__}: ragged or non-numeric")
        dtype = dtypes.to_dtype(dtype) if dtype is not None else dtypes.from_numpy_dtype(array.dtype)
        self.node = Node.of_buffer(dtypes.narrow(array, dtype), dtype, writable=True)

    # ---- construction -----------------------------------------------------------------------
    @staticmethod
    def from_numpy(array: np.ndarray, dtype=None) -> "Tensor":
        """Wrap an array's memory without copying, as torch.from_numpy does: weights stay
        memory-mapped. For bfloat16, `array` holds the raw uint16 bits."""
        dtype = dtypes.to_dtype(dtype) if dtype is not None else dtypes.from_numpy_dtype(array.dtype)
        return Tensor(Node.of_buffer(array, dtype, writable=array.flags.writeable))

    @staticmethod
    def _source(op, payload, shape, dtype) -> "Tensor":
        return Tensor(Node(op, (), (payload, tuple(shape), dtypes.to_dtype(dtype))))

    @staticmethod
    def full(shape, value, dtype=None) -> "Tensor":
        if dtype is None:
            dtype = (dtypes.bool_ if isinstance(value, bool) else
                     dtypes.default_int if isinstance(value, int) else dtypes.default_float)
        return Tensor._source("const", value, shape_arg((shape,)), dtype)

    @staticmethod
    def zeros(*shape, dtype=dtypes.float32) -> "Tensor":
        return Tensor.full(shape_arg(shape), 0, dtype)

    @staticmethod
    def ones(*shape, dtype=dtypes.float32) -> "Tensor":
        return Tensor.full(shape_arg(shape), 1, dtype)

    @staticmethod
    def empty(*shape, dtype=dtypes.float32) -> "Tensor":
        return Tensor._source("empty", None, shape_arg(shape), dtype)

    @staticmethod
    def arange(start, stop=None, step=1, dtype=None) -> "Tensor":
        if stop is None:
            start, stop = 0, start
        if step == 0:
            raise ValueError("arange: step must not be 0")
        if dtype is None:
            is_int = all(isinstance(v, int) for v in (start, stop, step))
            dtype = dtypes.default_int if is_int else dtypes.default_float
        length = max(0, math.ceil((stop - start) / step))
        return Tensor._source("arange", (start, step), (length,), dtype)

    @staticmethod
    def randn(*shape, seed=None, dtype=dtypes.float32) -> "Tensor":
        """Standard normal samples; the same seed gives the same numbers on every backend."""
        seed = secrets.randbits(63) if seed is None else int(seed)
        return Tensor._source("randn", seed, shape_arg(shape), dtype)

    # ---- properties and values --------------------------------------------------------------
    shape = property(lambda self: self.node.shape)
    dtype = property(lambda self: self.node.dtype)
    ndim = property(lambda self: len(self.node.shape))
    numel = property(lambda self: math.prod(self.node.shape))

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self):
        state = "realized" if self.node.realized else f"lazy {self.node.op}"
        return f"<Tensor {self.shape} {self.dtype.name} {state}>"

    def realize(self, *others: "Tensor") -> "Tensor":
        """Compute this tensor (and others, sharing their common work) now."""
        _realize([t.node for t in (self, *others)])
        return self

    def numpy(self) -> np.ndarray:
        """A copy of the values; bfloat16 and block types come out as float32, as NumPy has
        neither."""
        self.realize()
        return np.array(dtypes.widen(self.node.buffer, self.dtype) if self.dtype == dtypes.bfloat16
                        or self.dtype.block else self.node.buffer, copy=True)

    def item(self):
        if self.numel != 1:
            raise ValueError(f"item() needs a tensor of one element, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def __bool__(self):
        return bool(self.item())

    # ---- recording helpers ------------------------------------------------------------------
    def _op(self, op, *srcs, arg=None) -> "Tensor":
        return Tensor(Node(op, (self.node, *(s.node for s in srcs)), arg))

    def _axis(self, axis: int, ndim: int | None = None) -> int:
        ndim = self.ndim if ndim is None else ndim
        if not -max(ndim, 1) <= axis < max(ndim, 1):
            raise IndexError(f"axis {axis} out of range for shape {self.shape}")
        return axis % max(ndim, 1)

    def _as_tensor(self, value) -> "Tensor":
        if isinstance(value, Tensor):
            return value
        if isinstance(value, (bool, int, float)):
            return Tensor.full((), value, _scalar_dtype(value, self.dtype))
        return Tensor(value)

    def _broadcast_with(self, *others):
        tensors = [self, *(self._as_tensor(o) for o in others)]
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = dtypes.promote(dtype, t.dtype)
        shape = broadcast_shape(*(t.shape for t in tensors))
        return [t.cast(dtype).broadcast_to(shape) for t in tensors]

    def _binary(self, op, other, reverse=False) -> "Tensor":
        a, b = self._broadcast_with(other)
        if op in ("div", "pow") and not a.dtype.is_float:
            a, b = a.cast(dtypes.default_float), b.cast(dtypes.default_float)
        return b._op(op, a) if reverse else a._op(op, b)

    def _unary(self, op) -> "Tensor":
        x = self if self.dtype.is_float or op in ("neg", "abs", "relu") else self.cast(dtypes.default_float)
        return x._op(op)

    # ---- elementwise ------------------------------------------------------------------------
    def __add__(self, o): return self._binary("add", o)
    def __radd__(self, o): return self._binary("add", o, reverse=True)
    def __sub__(self, o): return self._binary("sub", o)
    def __rsub__(self, o): return self._binary("sub", o, reverse=True)
    def __mul__(self, o): return self._binary("mul", o)
    def __rmul__(self, o): return self._binary("mul", o, reverse=True)
    def __truediv__(self, o): return self._binary("div", o)
    def __rtruediv__(self, o): return self._binary("div", o, reverse=True)
    def __pow__(self, o): return self._binary("pow", o)
    def __rpow__(self, o): return self._binary("pow", o, reverse=True)
    def __neg__(self): return self._unary("neg")
    def __lt__(self, o): return self._binary("cmplt", o)
    def __le__(self, o): return self._binary("cmple", o)
    def __gt__(self, o): return self._binary("cmpgt", o)
    def __ge__(self, o): return self._binary("cmpge", o)
    def __eq__(self, o): return self._binary("cmpeq", o)  # type: ignore[override]
    def __ne__(self, o): return self._binary("cmpne", o)  # type: ignore[override]

    def neg(self): return self._unary("neg")
    def exp(self): return self._unary("exp")
    def log(self): return self._unary("log")
    def sqrt(self): return self._unary("sqrt")
    def rsqrt(self): return self._unary("rsqrt")
    def sin(self): return self._unary("sin")
    def cos(self): return self._unary("cos")
    def tanh(self): return self._unary("tanh")
    def abs(self): return self._unary("abs")
    def relu(self): return self._unary("relu")
    def sigmoid(self): return self._unary("sigmoid")
    def silu(self): return self._unary("silu")
    def gelu(self): return self._unary("gelu")
    def square(self): return self * self
    def maximum(self, o): return self._binary("maximum", o)
    def minimum(self, o): return self._binary("minimum", o)

    def where(self, x, y) -> "Tensor":
        """Elementwise `x if self else y` (self is the condition); x or y may be numbers."""
        cond = self.cast(dtypes.bool_)
        if isinstance(x, Tensor):
            x, y = x._broadcast_with(y)
        elif isinstance(y, Tensor):
            y, x = y._broadcast_with(x)
        else:
            x, y = Tensor.full((), x)._broadcast_with(y)
        shape = broadcast_shape(cond.shape, x.shape)
        return cond.broadcast_to(shape)._op("where", x.broadcast_to(shape), y.broadcast_to(shape))

    def cast(self, dtype) -> "Tensor":
        dtype = dtypes.to_dtype(dtype)
        return self if dtype == self.dtype else self._op("cast", arg=dtype)

    def float(self): return self.cast(dtypes.float32)

    # ---- reductions -------------------------------------------------------------------------
    def _axes(self, axis) -> tuple[int, ...]:
        if axis is None:
            return tuple(range(self.ndim))
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        return tuple(sorted({self._axis(a) for a in axes})) if self.ndim else ()

    def _reduce(self, op, axis, keepdim) -> "Tensor":
        axes = self._axes(axis)
        out = self._op(op, arg=axes)
        return out if keepdim else out.reshape(tuple(n for i, n in enumerate(self.shape) if i not in axes))

    def sum(self, axis=None, keepdim=False):
        x = self if self.dtype.is_float else self.cast(dtypes.default_int)
        return x._reduce("sum", axis, keepdim)

    def max(self, axis=None, keepdim=False): return self._reduce("max", axis, keepdim)
    def min(self, axis=None, keepdim=False): return self._reduce("min", axis, keepdim)

    def mean(self, axis=None, keepdim=False):
        x = self if self.dtype.is_float else self.cast(dtypes.default_float)
        count = math.prod(self.shape[a] for a in self._axes(axis))
        return x.sum(axis, keepdim) / count

    def argmax(self, axis=None, keepdim=False):
        if axis is None:
            out = self.flatten()._reduce("argmax", 0, keepdim=False)
            return out.reshape((1,) * self.ndim) if keepdim else out
        return self._reduce("argmax", self._axis(axis), keepdim)

    # ---- movement ---------------------------------------------------------------------------
    def reshape(self, *shape) -> "Tensor":
        shape = list(shape_arg(shape))
        if shape.count(-1) > 1:
            raise ValueError(f"reshape: only one -1 allowed in {tuple(shape)}")
        if -1 in shape:
            known = math.prod(n for n in shape if n != -1)
            if known == 0 or self.numel % known:
                raise ValueError(f"reshape: cannot view shape {self.shape} as {tuple(shape)}")
            shape[shape.index(-1)] = self.numel // known
        shape = tuple(shape)
        return self if shape == self.shape else self._op("reshape", arg=shape)

    def permute(self, *order) -> "Tensor":
        order = tuple(self._axis(a) for a in shape_arg(order))
        return self if order == tuple(range(self.ndim)) else self._op("permute", arg=order)

    def transpose(self, axis0=-2, axis1=-1) -> "Tensor":
        order = list(range(self.ndim))
        a, b = self._axis(axis0), self._axis(axis1)
        order[a], order[b] = order[b], order[a]
        return self.permute(order)

    T = property(lambda self: self.permute(tuple(reversed(range(self.ndim)))))

    def broadcast_to(self, shape) -> "Tensor":
        shape = tuple(shape)
        if shape == self.shape:
            return self
        if self.node.op == "const" and len(shape) >= self.ndim:  # a constant of the full shape
            broadcast_shape(self.shape, shape)  # (raises if it does not broadcast)
            return Tensor.full(shape, self.node.arg[0], self.dtype)
        if len(shape) < self.ndim:
            raise ValueError(f"expand: cannot broadcast shape {self.shape} to {shape}")
        x = self.reshape((1,) * (len(shape) - self.ndim) + self.shape)
        return x._op("expand", arg=shape) if x.shape != shape else x

    def expand(self, *shape) -> "Tensor":
        """Broadcast to `shape`; -1 keeps a size, new axes may be added in front (as PyTorch)."""
        shape = shape_arg(shape)
        lead = len(shape) - self.ndim
        return self.broadcast_to(tuple(self.shape[i - lead] if n == -1 else n for i, n in enumerate(shape)))

    def flatten(self, start_axis=0, end_axis=-1) -> "Tensor":
        if self.ndim == 0:
            return self.reshape(1)
        s, e = self._axis(start_axis), self._axis(end_axis)
        return self.reshape(self.shape[:s] + (math.prod(self.shape[s:e + 1]),) + self.shape[e + 1:])

    def squeeze(self, axis=None) -> "Tensor":
        if axis is None:
            return self.reshape(tuple(n for n in self.shape if n != 1))
        a = self._axis(axis)
        return self if self.shape[a] != 1 else self.reshape(self.shape[:a] + self.shape[a + 1:])

    def unsqueeze(self, axis) -> "Tensor":
        a = self._axis(axis, self.ndim + 1)
        return self.reshape(self.shape[:a] + (1,) + self.shape[a:])

    def contiguous(self) -> "Tensor":
        return self._op("contiguous")

    # ---- across processes (tensor parallelism, see tinytensor.distributed) -------------------
    def allreduce(self, group) -> "Tensor":
        """The sum of this tensor over every process of `group` (itself when alone)."""
        return self if group.size == 1 else self._op("allreduce", arg=group)

    def allgather(self, group, axis: int = -1) -> "Tensor":
        """Every process's tensor, concatenated along `axis` in rank order (itself when alone)."""
        return self if group.size == 1 else self._op("allgather", arg=(group, self._axis(axis)))

    def pad(self, pads, value=0.0) -> "Tensor":
        """pads: one (before, after) pair, or None, per axis."""
        if len(pads) != self.ndim:
            raise ValueError(f"pad: {len(pads)} pairs for shape {self.shape}")
        pads = tuple((0, 0) if p is None else (int(p[0]), int(p[1])) for p in pads)
        return self if not any(a or b for a, b in pads) else self._op("pad", arg=(pads, value))

    def cat(self, *others, axis=0) -> "Tensor":
        tensors = [self, *others]
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = dtypes.promote(dtype, t.dtype)
        axis = self._axis(axis)
        casted = [t.cast(dtype) for t in tensors]
        return casted[0]._op("cat", *casted[1:], arg=axis) if len(casted) > 1 else casted[0]

    def stack(self, *others, axis=0) -> "Tensor":
        a = self._axis(axis, self.ndim + 1)
        return Tensor.cat(*(t.unsqueeze(a) for t in (self, *others)), axis=a)

    # ---- indexing: tinytensor/indexing.py ---------------------------------------------------
    __getitem__ = indexing.getitem
    __setitem__ = indexing.setitem
    assign_at = indexing.assign_at
    assign = indexing.assign

    # ---- matmul and nn ----------------------------------------------------------------------
    def matmul(self, other) -> "Tensor":
        a, b = self, self._as_tensor(other)
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul: both operands need at least 1 axis, got shapes {a.shape} and {b.shape}")
        if b.dtype.block and b.ndim == 2 and b.node.op == "permute":
            return a._block_product(b)
        dtype = dtypes.promote(a.dtype, b.dtype)
        a2 = a.cast(dtype).reshape((1,) + a.shape) if a.ndim == 1 else a.cast(dtype)
        b2 = b.cast(dtype).reshape(b.shape + (1,)) if b.ndim == 1 else b.cast(dtype)
        if a2.shape[-1] != b2.shape[-2]:
            raise ValueError(f"matmul: cannot multiply shapes {a.shape} and {b.shape} "
                             f"(inner sizes {a2.shape[-1]} and {b2.shape[-2]} differ)")
        try:
            batch = broadcast_shape(a2.shape[:-2], b2.shape[:-2])
        except ValueError:
            raise ValueError(f"matmul: batch axes of shapes {a.shape} and {b.shape} do not broadcast") from None
        out = a2.broadcast_to(batch + a2.shape[-2:])._op("matmul", b2.broadcast_to(batch + b2.shape[-2:]))
        shape = out.shape
        if a.ndim == 1:
            shape = shape[:-2] + shape[-1:]
        if b.ndim == 1:
            shape = shape[:-1]
        return out.reshape(shape)

    __matmul__ = matmul

    def _block_product(self, wt) -> "Tensor":
        """x @ W.T for W stored in blocks (nn.linear's form), read as stored: x meets it
        quantised to 8 bits per block (ops.blocks.product), as in llama.cpp. Any other product
        with a block tensor casts it (dequantises it) first."""
        x = self.cast(dtypes.float32)
        if x.shape[-1] != wt.shape[0]:
            raise ValueError(f"matmul: cannot multiply shapes {self.shape} and {wt.shape} "
                             f"(inner sizes {x.shape[-1]} and {wt.shape[0]} differ)")
        rows = x.reshape((-1, x.shape[-1]))._op("matmul", wt, arg=dtypes.float32)
        return rows.reshape(x.shape[:-1] + wt.shape[-1:])

    def __rmatmul__(self, other):
        return self._as_tensor(other).matmul(self)

    def softmax(self, axis=-1):
        from tinytensor import nn
        return nn.softmax(self, axis)

    def log_softmax(self, axis=-1):
        from tinytensor import nn
        return nn.log_softmax(self, axis)
