"""Lowering: each node the LLVM backend runs natively becomes *calls*, compiled kernels bound
to their pointers and ranges, one per thread, collected in a Plan. Movement ops stay NumPy views
(no copies); a node without a native kernel yet (gather, cat, pad, argmax, random numbers...) is
not lowered here and runs its NumPy reference (see backend.py).
"""
import hashlib
from functools import partial
from itertools import groupby
from typing import NamedTuple

import numpy as np

import ops
from backends.numpy_backend import run_node as reference_node
from backends.llvm import codegen, column_lanes, signatures, threads
from backends.llvm.attention import attention_kernel
from backends.llvm.compiler import compile_function
from backends.llvm.quantised import quantize_rows_kernel
from backends.llvm.target import vector_registers
from ops import dtypes
from ops.blocks import BLOCK
from ops.elementwise import ELEMENTWISE
from ops.fused import Instruction
from ops.reduce import REDUCE

_kernels: dict = {}


def _kernel(key, make_ir, signature: signatures.Signature):
    """The compiled function for a kernel structure, built on first use. Its name comes from its
    content, not from the order kernels are first met: the name is part of the IR that the disk
    cache is keyed by, so the same kernel met in another order (another model, another prompt)
    must have the same name to be found there."""
    if key not in _kernels:
        name = "k" + hashlib.sha256(make_ir("kernel").encode()).hexdigest()[:16]
        _kernels[key] = compile_function(make_ir(name), name, signature.argtypes)
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
    fn = _kernel(key, lambda name: build(name, program, in_types, out_type, rank, inner, *extra),
                 signatures.loop(len(operands)))
    dims_arr, strides_arr = np.array(dims, np.int64), np.array(strides, np.int64).reshape(-1)
    plan.keep += [dims_arr, strides_arr, *operands]
    work = int(np.prod(dims)) * len(operands)
    plan.kernel(threads.split(fn, dims[0], 1, work, dims_arr.ctypes.data, strides_arr.ctypes.data,
                              *(a.ctypes.data for a in operands)))


def elementwise(plan, program, arrays, in_types, out, out_type):
    if out.size:
        operands = [out, *arrays]
        dims, strides = collapse(out.shape, [_strides(a) for a in operands])
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
    red_dims, red_strides = collapse(views[0].shape[nk:], [_strides(v)[nk:] for v in views])
    if len(red_dims) > 1:  # reduced axes that do not merge: copy so that they do
        views = [plan.contiguous(v) for v in views]
        red_dims, red_strides = collapse(views[0].shape[nk:], [_strides(v)[nk:] for v in views])
    out_strides = [_strides(out)[i] for i in kept]
    kept_dims, kept_strides = collapse(views[0].shape[:nk], [out_strides] + [_strides(v)[:nk] for v in views])
    strides = [k + r for k, r in zip(kept_strides, [[0]] + red_strides)]
    _loop_calls(plan, program, in_types, out_type, [out, *views], kept_dims + red_dims, strides, reduce)


# x rows per step of the column-lane kernels: 8 and 16 lanes ran 1.6x the 4 x 4 block_sums at 64
# rows; with 16 lanes, 12 rows ran 0.9-1.3x 8 rows on q4_k and q6_k at 64, 96 and 128 rows
LANE_ROWS = 12


def _block(m: int, weights: int = 1, quantised: bool = False, lanes: int = 0, pairs: bool = False):
    """Rows x columns of C per step. Float weights: 4 x 3 keeps 12 accumulators and 7 loads in
    AVX2's 16 registers (measured best at 128 rows); with 32 registers (AVX-512) 4 x 6 (24
    accumulators) measured 1.1-1.4x faster with float16/float32 weights at 8-512 rows; bfloat16
    weights read in pairs (codegen.pair_major) hold two rows of A per row, and 4 x 5 (20
    accumulators, 8 rows of A) ran 1.2-1.35x 4 x 6 (64 x 8192 x 2048, alternating). With two
    weights (SwiGLU) each column needs two accumulators: with 16 registers 4 x 1 measured 1.5x
    faster than 3 x 2, which spills; with 32, 4 x 3 1.4-2.1x faster than 4 x 1. One row streams
    4 weight rows at a time. Block weights: 4 x 4 measured 5-30% faster than 4 x 2 at 64 rows;
    one row reads one weight row at a time (1 x 1 streamed 10-15% faster than 1 x 4, as
    llama.cpp reads them)."""
    if lanes and m >= 4:  # column_lanes: `lanes` columns in the lanes of each vector
        return (LANE_ROWS if m >= LANE_ROWS else 4, lanes)
    if quantised:
        return (1, 1) if m < 4 else (4, max(1, 4 // weights))
    wide = vector_registers() >= 32
    if weights == 1:
        return (1, 4) if m < 4 else (4, (5 if pairs else 6) if wide else 3)
    return (1, 2) if m < 4 else (4, 3 if wide else 1)


def matmul(plan, a, b, a_type, b_type, out, out_type):
    """Batched C = A @ B. B walked along k with unit stride (x @ W.T) uses the dot-product
    kernel; B with unit-stride rows (p @ v) uses the row kernel; anything else is copied."""
    m, n, k = out.shape[-2], out.shape[-1], a.shape[-1]
    if out.size == 0 or k == 0:
        plan.steps.append(partial(out.fill, 0))
        return
    if a.strides[-1] != a.itemsize:
        a = plan.contiguous(a)
    nt = b.strides[-2] == b.itemsize
    if not nt and b.strides[-1] != b.itemsize:
        b = plan.contiguous(b)
    batch = list(np.ndindex(out.shape[:-2]))
    threaded = len(batch) == 1
    if nt and codegen.pair_major([b_type]):
        a = _pair_major(plan, a, a_type)
    plan.keep += [a, b, out]
    groups = [g for idx in batch for g in (
        _matmul_nt(a[idx], [np.swapaxes(b[idx], -1, -2)], out[idx], a_type, [b_type], out_type, threaded) if nt else
        _matmul_nn(a[idx], b[idx], out[idx], a_type, b_type, out_type, m, n, k, threaded))]
    if threaded:
        plan.kernel(threads.together(groups))
    else:  # heads of attention: each product is small, so threads take whole products
        plan.kernel(threads.spread([call for group in groups for call in group]))


def linear(plan, node, arrays, out):
    """fused_linear (ops.linear): the RMSNorm of the input rows first, into a scratch buffer of
    m x k floats (two native loops: sum of squares, then scale), then the product over every
    weight with the epilogue applied as C is stored, all threads entering once."""
    eps, j, src_types, program = node.arg.eps, node.arg.n_weights, node.arg.src_types, node.arg.program
    first = 1 if eps is None else 2
    a, weights, extras = arrays[0], arrays[first:first + j], arrays[first + j:]
    w_types, e_types = src_types[first:first + j], src_types[first + j:]
    if a.strides[-1] != a.itemsize:
        a = plan.contiguous(a)
    if eps is not None:
        a = _rms_norm(plan, a, arrays[1], src_types[1], eps)
    if codegen.pair_major(w_types):
        a = _pair_major(plan, a, dtypes.float32)
    weights = [w if w.strides[-1] == w.itemsize else plan.contiguous(w) for w in weights]
    extras = [x if x.strides[-1] == x.itemsize else plan.contiguous(x) for x in extras]
    plan.keep += [a, *weights, *extras, out]
    if out.size == 0:
        return
    # block weights meet the rows in 8 bits, one scale per block of their format (ops.blocks),
    # quantised once for all the weights of a format's block size
    q8 = {group: _quantize_rows(plan, a, group) for group in sorted({t.block.values for t in w_types if t.block})}
    rows = [q8[t.block.values] if t.block else a for t in w_types]
    if program == "concat":  # each weight fills its own columns
        bounds = np.cumsum([0] + [w.shape[0] for w in weights])
        groups = [group for w, t, x, c0, c1 in zip(weights, w_types, rows, bounds, bounds[1:])
                  for group in _matmul_nt(x, [w], out[:, c0:c1], dtypes.float32, [t], node.dtype, True)]
    else:  # one kernel reads its weights' rows alike (passes.fuse_linear pairs only those)
        groups = _matmul_nt(rows[0], weights, out, dtypes.float32, w_types, node.dtype, True, extras,
                            e_types, program)
    plan.kernel(threads.together(groups))


class QuantisedRows(NamedTuple):
    """Rows as q8 blocks (ops.blocks.quantize_rows): bytes [m, k], scales and sums [m, k / 32]."""
    q: np.ndarray
    d: np.ndarray
    s: np.ndarray

    @property
    def shape(self):
        return self.q.shape


def _quantize_rows(plan, a, group: int) -> QuantisedRows:
    m, k = a.shape
    rows = QuantisedRows(np.empty((m, k), np.int8), *(np.empty((m, k // BLOCK), np.float32) for _ in range(2)))
    plan.keep += list(rows)
    fn = _kernel(("quantize_rows", group), lambda name: quantize_rows_kernel(name, group), signatures.QUANTIZE_ROWS)
    plan.kernel(threads.split(fn, m, 1, a.size, k, a.ctypes.data, _leading(a),
                              *(x.ctypes.data for x in rows)))
    return rows


def _row_args(A, start: int) -> list:
    """A kernel's arguments for the rows of A from `start`: float rows and their leading
    dimension, or q8 rows (signatures.matmul_nt)."""
    if isinstance(A, QuantisedRows):
        return [x.ctypes.data + start * x.strides[0] for x in A]
    return [A.ctypes.data + start * A.strides[0], _leading(A)]


def _leading(x: np.ndarray) -> int:
    """The leading dimension of a matrix with unit-stride rows, in elements (bytes for blocks)."""
    return x.strides[0] // x.itemsize


def _pair_major(plan, a, dtype):
    """A copy of a whose rows are pair-major (codegen.pair_major), made by native copies."""
    half = a.shape[-1] // 2
    out = np.empty(a.shape, a.dtype)
    plan.keep.append(out)
    parts = ((out[..., :half], a[..., 0:2 * half:2]), (out[..., half:2 * half], a[..., 1:2 * half:2]),
             (out[..., 2 * half:], a[..., 2 * half:]))
    for dst, src in parts:
        elementwise(plan, (("cast", dtype, (0,), dtype),), [src], [dtype], dst, dtype)
    return out


def _rms_norm(plan, x, g, g_type, eps):
    """Llama's RMSNorm of x's rows as nn.rms_norm's ops compute it, into a new array."""
    f32 = dtypes.float32
    m, k = x.shape
    total, normed = np.empty((m, 1), np.float32), np.empty((m, k), np.float32)
    plan.keep += [total, normed]
    reduction(plan, "sum", (("mul", None, (0, 0), f32),), [x], [f32], (1,), total, f32)
    scale = (("const", (float(k),), (), f32), ("div", None, (1, 3), f32), ("const", (eps,), (), f32),
             ("add", None, (4, 5), f32), ("rsqrt", None, (6,), f32), ("mul", None, (0, 7), f32),
             ("mul", None, (8, 2), f32))
    elementwise(plan, scale, [x, np.broadcast_to(total, (m, k)), np.broadcast_to(g, (m, k))], [f32, f32, g_type],
                normed, f32)
    return normed


def _matmul_nt(A, W, C, a_type, w_types, c_type, threaded, E=(), e_types=(), program=()):
    """Groups of calls (each group one kernel split across threads when `threaded`) computing
    C = epilogue(A @ W[0].T, ..., E...): the row and column tails get their own kernels."""
    m, k, n = A.shape[0], A.shape[1], C.shape[1]
    quantised = any(t.block for t in w_types)
    lanes = column_lanes.columns() if column_lanes.reads(w_types) else 0
    mr, nr = _block(m, len(W), quantised, lanes, codegen.pair_major(w_types))
    groups, row_groups, start = [], [], 0
    # rows in steps of mr, then (column lanes) 4: a lane kernel's single rows each transpose the weights again
    for step in [mr, 4, 1] if lanes and mr > 4 else [mr, 1]:
        end = start + (m - start) // step * step
        row_groups.append((range(start, end), step))
        start = end
    nb = n - n % nr
    for rows, row_block in row_groups:
        for cols, col_block in ((range(0, nb), nr), (range(nb, n), 1)):
            if not len(rows) or not len(cols):
                continue
            # the column-lane kernels are built for their K and weights' strides (codegen.matmul_nt_kernel)
            fixed = (k, tuple(_leading(w) for w in W)) if lanes and col_block == lanes and row_block > 1 else None
            key = ("nt", a_type, tuple(w_types), c_type, row_block, col_block, tuple(e_types), program, fixed)
            fn = _kernel(key, lambda name: codegen.matmul_nt_kernel(name, a_type, w_types, c_type, row_block,
                                                                    col_block, e_types, program, fixed=fixed),
                         signatures.matmul_nt(len(W), len(E), quantised))
            work = len(cols) * sum(w.strides[0] for w in W) if threaded else 0  # bytes of weights
            weights = [x for w in W for x in (w.ctypes.data + cols.start * w.strides[0], _leading(w))]
            extras = [x for e in [C, *E] for x in (e.ctypes.data + rows.start * e.strides[0] + cols.start * e.itemsize,
                                                    _leading(e))]
            groups.append(threads.split(fn, len(cols), col_block, work, len(rows), k, *_row_args(A, rows.start),
                                        *weights, *extras))
    return groups


ATTENTION_TILE = 4  # query rows sharing each k and v row loaded, in groups of more than 8


def attention(plan, node, arrays, out):
    """The attention op (ops.linear) with attention_kernel (attention.py): query rows that read the
    same k and v (grouped-query heads, positions) are gathered into one table, in tiles that
    share every k and v row loaded; the groups are dealt to the threads."""
    scale, kind = node.arg.scale, node.arg.mask
    q, k, v = (x if x.strides[-1] == x.itemsize else plan.contiguous(x) for x in arrays[:3])
    mask = arrays[3] if kind else None
    nb = q.ndim - 2
    if out.size == 0 or k.shape[-2] == 0:
        plan.steps.append(partial(np.copyto, out, reference_node(node, arrays)))
        return
    pairs = np.stack([_row_addresses(k, nb).ravel(), _row_addresses(v, nb).ravel()], axis=1)
    order = np.lexsort(pairs.T[::-1])  # batch items that share k and v next to each other
    columns = [_row_addresses(a, nb + 1).reshape(-1, q.shape[-2])[order].ravel() for a in (q, out)]
    columns.append(np.zeros_like(columns[0]) if mask is None else
                   _row_addresses(mask, nb + 1).reshape(-1, q.shape[-2])[order].ravel())
    table = np.ascontiguousarray(np.stack(columns, axis=1), dtype=np.int64)
    mstride = 0 if mask is None else mask.strides[-1] // mask.itemsize
    plan.keep += [q, k, v, out, table] + ([mask] if mask is not None else [])
    S, D, DV = k.shape[-2], q.shape[-1], v.shape[-1]
    starts = np.flatnonzero(np.r_[True, np.any(pairs[order][1:] != pairs[order][:-1], axis=1)]) * q.shape[-2]
    calls = []
    for g0, g1, (kp, vp) in zip(starts, list(starts[1:]) + [len(table)], pairs[order][starts // q.shape[-2]]):
        # a group of up to 8 rows (a GQA group at decode) is one tile; more go 4 at a time
        tile = g1 - g0 if g1 - g0 <= 8 else ATTENTION_TILE
        tiled = g0 + (g1 - g0) // tile * tile
        for r0, r1, rows in ((int(g0), int(tiled), int(tile)), (int(tiled), int(g1), int((g1 - g0) % tile))):
            if r0 == r1:
                continue
            fn = _kernel(("attention", rows, scale, kind),
                         lambda name: attention_kernel(name, rows, scale, kind), signatures.ATTENTION)
            piece = max(rows, -(-(r1 - r0) // threads.count() // rows) * rows)  # a share per thread in one group
            calls += [partial(fn, a, min(a + piece, r1), table.ctypes.data, int(kp), k.strides[-2] // 4, int(vp),
                              v.strides[-2] // 4, S, D, DV, mstride) for a in range(r0, r1, piece)]
    plan.kernel(threads.spread(calls, work=len(table) * S * (D + DV)))


def _row_addresses(a: np.ndarray, axes: int) -> np.ndarray:
    """The address of a[i0, ..., i_{axes-1}, 0, ...] for every index of the first `axes` axes."""
    offsets = np.zeros(a.shape[:axes], np.int64)
    for axis in range(axes):
        step = np.arange(a.shape[axis], dtype=np.int64) * a.strides[axis]
        offsets = offsets + step.reshape([-1 if i == axis else 1 for i in range(axes)])
    return a.ctypes.data + offsets


def _matmul_nn(A, B, C, a_type, b_type, c_type, m, n, k, threaded):
    if c_type != dtypes.float32:  # the row kernel accumulates in C itself: float32 only
        return [[lambda: np.copyto(C, ops.run_reference("matmul", [A, B], [a_type, b_type], None, C.shape, c_type))]]
    fn = _kernel(("nn", a_type, b_type), lambda name: codegen.matmul_nn_kernel(name, a_type, b_type),
                 signatures.MATMUL_NN)
    return [threads.split(fn, m, 1, m * n * k if threaded else 0, n, k, A.ctypes.data, _leading(A),
                          B.ctypes.data, _leading(B), C.ctypes.data, _leading(C))]


def _fused(plan, node, arrays, out):
    elementwise(plan, node.arg.program, arrays, [s.dtype for s in node.srcs], out, node.dtype)


def _fused_reduce(plan, node, arrays, out):
    reduction(plan, node.arg.reduce, node.arg.program, arrays, [s.dtype for s in node.srcs], node.arg.axes, out,
              node.dtype)


def _elementwise_op(plan, node, arrays, out):
    program = (Instruction(node.op, node.arg, tuple(range(len(arrays))), node.dtype),)
    elementwise(plan, program, arrays, [s.dtype for s in node.srcs], out, node.dtype)


def _reduce_op(plan, node, arrays, out):
    program = (Instruction("cast", node.dtype, (0,), node.dtype),)  # the identity: read the input as is
    reduction(plan, node.op, program, arrays, [s.dtype for s in node.srcs], node.arg, out, node.dtype)


def _matmul_op(plan, node, arrays, out):
    matmul(plan, *arrays, *(s.dtype for s in node.srcs), out, node.dtype)


# op -> (whether this node of it runs natively, the lowering that adds its calls to a plan)
LOWERINGS = {
    "fused": (lambda node: True, _fused),
    "fused_reduce": (lambda node: True, _fused_reduce),
    "fused_linear": (lambda node: True, linear),
    "attention": (lambda node: True, attention),
    "matmul": (lambda node: node.dtype.is_float, _matmul_op),
    **{op: (lambda node: bool(node.srcs), _elementwise_op) for op in ELEMENTWISE},
    **{op: (lambda node: True, _reduce_op) for op in REDUCE},
}


def native(node) -> bool:
    """Whether `node` has a kernel here; the others run their NumPy meaning."""
    if any(s.dtype.block for s in node.srcs) and node.op != "fused_linear":
        return False  # the reference dequantises (a cast) or picks rows (a gather)
    return node.op in LOWERINGS and LOWERINGS[node.op][0](node)


def plan_node(plan, node, arrays, out):
    """Add the calls that compute `node` from `arrays` into `out`."""
    LOWERINGS[node.op][1](plan, node, arrays, out)
