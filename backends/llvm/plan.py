"""What lowering produces: a Plan, the kernel calls (one per thread) that compute one node, and
the pieces every lowering uses: kernels compiled once per structure (`kernel`), and the loop
kernels that run an elementwise program or a reduction over arrays of any strides."""
import hashlib
from functools import partial
from itertools import groupby
from typing import NamedTuple

import numpy as np

from backends.llvm import codegen, signatures, threads
from backends.llvm.compiler import compile_function
from backends.llvm.target import host

_kernels: dict = {}


def kernel(key, make_ir, signature: signatures.Signature):
    """The compiled function for a kernel structure, built on first use. Its name comes from its
    content, not from the order kernels are first met: the name is part of the IR that the disk
    cache is keyed by, so the same kernel met in another order (another model, another prompt)
    must have the same name to be found there. Kept per target (TT_TARGET's level)."""
    key = (host(), key)
    if key not in _kernels:
        name = "k" + hashlib.sha256(make_ir("kernel").encode()).hexdigest()[:16]
        _kernels[key] = compile_function(make_ir(name), name, signature.argtypes)
    return _kernels[key]


def element_strides(a: np.ndarray) -> list[int]:
    return [s // a.itemsize for s in a.strides]


def collapse(shape, operand_strides):
    """Merge neighbouring axes that every operand walks as one, and drop size-1 axes, so a
    contiguous tensor of any rank becomes one flat loop."""
    axes = [i for i, n in enumerate(shape) if n != 1] or [None]
    dims = [shape[i] if i is not None else 1 for i in axes]
    strides = [[s[i] if i is not None else 0 for i in axes] for s in operand_strides]
    out_dims, out_strides = [dims[0]], [[s[0]] for s in strides]
    for d in range(1, len(dims)):
        if all(o[-1] == s[d] * dims[d] for o, s in zip(out_strides, strides)):
            out_dims[-1] *= dims[d]
            for o, s in zip(out_strides, strides):
                o[-1] = s[d]
        else:
            out_dims.append(dims[d])
            for o, s in zip(out_strides, strides):
                o.append(s[d])
    return out_dims, out_strides


class Plan:
    """The calls that compute one node, plus the copies they need first and the small arrays
    (dims, strides) their pointers refer to, kept alive as long as the calls."""

    def __init__(self, fixed: bool):
        self.fixed = fixed  # buffers stay put (a prepared replay): copies must be redone per run
        self.steps, self.keep = [], []
        self.runs = None

    def contiguous(self, a: np.ndarray) -> np.ndarray:
        if a.flags.c_contiguous:
            return a
        if not self.fixed:
            return np.ascontiguousarray(a)
        copy = np.empty(a.shape, a.dtype)
        self.steps.append(partial(np.copyto, copy, a))
        return copy

    def kernel(self, calls: list):
        self.steps.append(_Kernel(calls))

    def run(self):
        if self.runs is None:  # consecutive kernels run as one native run, without Python between them
            self.runs = []
            for native, steps in groupby(self.steps, key=lambda s: isinstance(s, _Kernel) and threads.native(s.calls)):
                # a kernel with Python calls runs alone, so that it does not take its neighbours
                # off the threads (a run with any Python call goes call by call on this thread)
                self.runs += [threads.Run([k.calls for k in steps])] if native else \
                    [threads.Run([s.calls]) if isinstance(s, _Kernel) else s for s in steps]
        for step in self.runs:
            step()


class _Kernel(NamedTuple):
    calls: list  # call t runs on thread t


def _loop_calls(plan, program, in_types, out_type, operands, dims, strides, reduce=None):
    rank = len(dims)
    inner = tuple(s[-1] if s[-1] in (0, 1) else None for s in strides)
    key = ("reduce" if reduce else "ew", program, tuple(in_types), out_type, rank, inner, reduce)
    build = codegen.reduce_kernel if reduce else codegen.elementwise_kernel
    extra = (reduce,) if reduce else ()
    fn = kernel(key, lambda name: build(name, program, in_types, out_type, rank, inner, *extra),
                 signatures.loop(len(operands)))
    dims_arr, strides_arr = np.array(dims, np.int64), np.array(strides, np.int64).reshape(-1)
    plan.keep += [dims_arr, strides_arr, *operands]
    work = int(np.prod(dims)) * len(operands)
    plan.kernel(threads.split(fn, dims[0], 1, work, dims_arr.ctypes.data, strides_arr.ctypes.data,
                              *(a.ctypes.data for a in operands)))


def elementwise(plan, program, arrays, in_types, out, out_type):
    if out.size:
        operands = [out, *arrays]
        dims, strides = collapse(out.shape, [element_strides(a) for a in operands])
        _loop_calls(plan, program, in_types, out_type, operands, dims, strides)


def reduction(plan, reduce, program, arrays, in_types, axes, out, out_type):
    """Reduce `axes` of the program's value: kept axes outside, reduced axes in one inner loop."""
    if out.size == 0:
        return
    if arrays[0].size == 0:
        plan.steps.append(partial(out.fill, 0))
        return
    kept = [i for i in range(arrays[0].ndim) if i not in axes]
    nk = len(kept)
    views = [np.transpose(a, kept + list(axes)) for a in arrays]
    red_dims, red_strides = collapse(views[0].shape[nk:], [element_strides(v)[nk:] for v in views])
    if len(red_dims) > 1:  # reduced axes that do not merge: copy so that they do
        views = [plan.contiguous(v) for v in views]
        red_dims, red_strides = collapse(views[0].shape[nk:], [element_strides(v)[nk:] for v in views])
    out_strides = [element_strides(out)[i] for i in kept]
    kept_dims, kept_strides = collapse(views[0].shape[:nk], [out_strides] + [element_strides(v)[:nk] for v in views])
    strides = [k + r for k, r in zip(kept_strides, [[0]] + red_strides)]
    _loop_calls(plan, program, in_types, out_type, [out, *views], kept_dims + red_dims, strides, reduce)
