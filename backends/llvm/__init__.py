"""The LLVM backend: each scheduled kernel becomes native SIMD code for the host CPU, compiled
once per kernel structure and run on all threads. Movement ops stay NumPy views (no copies),
and ops without a native kernel yet (gather, cat, pad, argmax, random numbers...) run their
NumPy reference, so every graph runs."""
import ctypes

import numpy as np

import ops
from backends.executor import run_schedule
from backends.llvm import codegen
from backends.llvm.compiler import compile_function
from backends.llvm.threads import parallel
from ops import dtypes
from ops.elementwise import BINARY, COMPARE, UNARY

ELEMENTWISE = set(UNARY) | set(BINARY) | set(COMPARE) | {"where", "cast"}
REDUCE = {"sum", "max", "min"}
P, I64 = ctypes.c_void_p, ctypes.c_int64
_kernels: dict = {}


def _kernel(key, make_ir, argtypes):
    """The compiled function for a kernel structure, built on first use."""
    if key not in _kernels:
        name = f"k{len(_kernels)}"
        _kernels[key] = compile_function(make_ir(name), name, argtypes)
    return _kernels[key]


def _strides(a: np.ndarray) -> list[int]:
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


def _run_loops(program, in_types, out_type, operands, dims, strides, reduce=None):
    rank = len(dims)
    inner = tuple(s[-1] if s[-1] in (0, 1) else None for s in strides)
    key = ("reduce" if reduce else "ew", program, tuple(in_types), out_type, rank, inner, reduce)
    build = codegen.reduce_kernel if reduce else codegen.elementwise_kernel
    extra = (reduce,) if reduce else ()
    fn = _kernel(key, lambda name: build(name, program, in_types, out_type, rank, inner, *extra),
                 [I64, I64, P, P] + [P] * len(operands))
    dims_arr = np.array(dims, np.int64)
    strides_arr = np.array(strides, np.int64).reshape(-1)
    work = int(np.prod(dims)) * (len(operands))
    parallel(fn, dims[0], 1, work, dims_arr.ctypes.data, strides_arr.ctypes.data, *(a.ctypes.data for a in operands))


def elementwise(program, arrays, in_types, shape, out_type):
    out = np.empty(shape, out_type.storage)
    if out.size:
        operands = [out, *arrays]
        dims, strides = collapse(shape, [_strides(a) for a in operands])
        _run_loops(program, in_types, out_type, operands, dims, strides)
    return out


def reduction(reduce, program, arrays, in_types, axes, shape, out_type):
    """Reduce `axes` of the program's value: kept axes outside, reduced axes in one inner loop."""
    ndim = arrays[0].ndim
    kept = [i for i in range(ndim) if i not in axes]
    views = [np.transpose(a, kept + list(axes)) for a in arrays]
    out = np.empty(shape, out_type.storage)
    if out.size == 0:
        return out
    if arrays[0].size == 0:
        out[...] = 0
        return out
    out_strides = [_strides(out)[i] for i in kept] + [0] * len(axes)
    nk = len(kept)
    red_dims, red_strides = collapse(views[0].shape[nk:], [_strides(v)[nk:] for v in views])
    if len(red_dims) > 1:  # reduced axes that do not merge: copy once so they do
        views = [np.ascontiguousarray(v) for v in views]
        red_dims, red_strides = collapse(views[0].shape[nk:], [_strides(v)[nk:] for v in views])
    kept_dims, kept_strides = collapse(views[0].shape[:nk], [out_strides[:nk]] + [_strides(v)[:nk] for v in views])
    strides = [k + r for k, r in zip(kept_strides, [[0]] + red_strides)]
    _run_loops(program, in_types, out_type, [out, *views], kept_dims + red_dims, strides, reduce)
    return out


def _block(m: int):
    return (1, 4) if m < 4 else (4, 2)


def matmul(a, b, a_type, b_type, shape, out_type):
    """Batched C = A @ B. B walked along k with unit stride (x @ W.T) uses the dot-product
    kernel; B with unit-stride rows (p @ v) uses the row kernel; anything else is copied once."""
    out = np.empty(shape, out_type.storage)
    m, n, k = shape[-2], shape[-1], a.shape[-1]
    if out.size == 0 or k == 0:
        out[...] = 0
        return out
    if a.strides[-1] != a.itemsize:
        a = np.ascontiguousarray(a)
    nt = b.strides[-2] == b.itemsize
    if not nt and b.strides[-1] != b.itemsize:
        b = np.ascontiguousarray(b)
    for idx in np.ndindex(shape[:-2]):
        A, B, C = a[idx], b[idx], out[idx]
        if nt:
            _matmul_nt(A, B, C, a_type, b_type, out_type, m, n, k)
        else:
            _matmul_nn(A, B, C, a_type, b_type, out_type, m, n, k)
    return out


def _matmul_nt(A, B, C, a_type, b_type, c_type, m, n, k):
    mr, nr = _block(m)
    lda, ldw, ldc = A.strides[0] // A.itemsize, B.strides[1] // B.itemsize, C.strides[0] // C.itemsize
    mb, nb = m - m % mr, n - n % nr
    args = [I64, I64, I64, I64, P, I64, P, I64, P, I64]
    for rows, row_block in ((range(0, mb), mr), (range(mb, m), 1)):
        if not len(rows):
            continue
        a_ptr = A.ctypes.data + rows.start * A.strides[0]
        c_ptr = C.ctypes.data + rows.start * C.strides[0]
        for cols, col_block in ((range(0, nb), nr), (range(nb, n), 1)):
            if not len(cols):
                continue
            key = ("nt", a_type, b_type, c_type, row_block, col_block)
            fn = _kernel(key, lambda name: codegen.matmul_nt_kernel(name, a_type, b_type, c_type, row_block, col_block),
                         args)
            parallel(fn, len(cols), col_block, len(cols) * k * B.itemsize, len(rows), k, a_ptr, lda,
                     B.ctypes.data + cols.start * B.strides[1], ldw, c_ptr + cols.start * C.itemsize, ldc)


def _matmul_nn(A, B, C, a_type, b_type, c_type, m, n, k):
    if c_type != dtypes.float32:  # the row kernel accumulates in C itself: float32 only
        C[...] = ops.run_reference("matmul", [A, B], [a_type, b_type], None, C.shape, c_type)
        return
    fn = _kernel(("nn", a_type, b_type), lambda name: codegen.matmul_nn_kernel(name, a_type, b_type),
                 [I64, I64, I64, I64, P, I64, P, I64, P, I64])
    parallel(fn, m, 1, m * n * k, n, k, A.ctypes.data, A.strides[0] // A.itemsize, B.ctypes.data,
             B.strides[0] // B.itemsize, C.ctypes.data, C.strides[0] // C.itemsize)


def run_node(node, arrays):
    in_types = [s.dtype for s in node.srcs]
    if node.op in ELEMENTWISE and arrays:
        program = ((node.op, node.arg, tuple(range(len(arrays))), node.dtype),)
        return elementwise(program, arrays, in_types, node.shape, node.dtype)
    if node.op in REDUCE:
        program = (("cast", node.dtype, (0,), node.dtype),)  # the identity: read the input as is
        return reduction(node.op, program, arrays, in_types, node.arg, node.shape, node.dtype)
    if node.op == "matmul" and node.dtype.is_float:
        return matmul(*arrays, *in_types, node.shape, node.dtype)
    return ops.run_reference(node.op, arrays, in_types, node.arg, node.shape, node.dtype)


class LLVMBackend:
    name = "llvm"

    def execute(self, schedule):
        return run_schedule(schedule, run_node)


BACKEND = LLVMBackend()
