"""Lowering: each node the LLVM backend runs natively becomes *calls*, compiled kernels bound
to their pointers and ranges, one per thread, collected in a Plan. Movement ops stay NumPy views
(no copies); a node without a native kernel yet (gather, cat, pad, argmax, random numbers...) is
not lowered here and runs its NumPy reference (see backend.py).
"""
from functools import partial

import numpy as np

from backends.numpy_backend import run_node as reference_node
from backends.llvm import signatures, threads
from backends.llvm.attention import attention_kernel, lanes_attention_kernel
from backends.llvm.plan import elementwise, kernel, reduction
from backends.llvm.products import linear, matmul
from backends.llvm.target import float_lanes, host
from ops.elementwise import ELEMENTWISE
from ops.fused import Instruction
from ops.reduce import REDUCE

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
        # a group of up to 8 rows (a GQA group at decode) is one tile; more go as many as two
        # vectors' lanes hold on x86 (AVX-512's 16, AVX2's 8), else 4 at a time (aarch64, whose
        # vector of 8 floats is two registers: not measured there) (the same bits either way)
        lanes = float_lanes() if host().arch == "x86_64" and g1 - g0 > 8 else 0
        tile = g1 - g0 if g1 - g0 <= 8 else 2 * lanes or ATTENTION_TILE
        tiled = g0 + (g1 - g0) // tile * tile
        for r0, r1, rows in ((int(g0), int(tiled), int(tile)), (int(tiled), int(g1), int((g1 - g0) % tile))):
            if r0 == r1:
                continue
            make = lanes_attention_kernel if rows > 8 else attention_kernel
            fn = kernel(("attention", make.__name__, rows, scale, kind),
                         lambda name: make(name, rows, scale, kind), signatures.ATTENTION)
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


def _cat(plan, node, arrays, out):
    """Each part copied into its place (a batch's rows of attention, one per sequence): native,
    so that a step's kernels are not cut into native runs by Python between them."""
    copy = (Instruction("cast", node.dtype, (0,), node.dtype),)  # the identity
    at = 0
    for part in arrays:
        n = part.shape[node.arg]
        place = out[(slice(None),) * node.arg + (slice(at, at + n),)]
        elementwise(plan, copy, [part], [node.dtype], place, node.dtype)
        at += n


# op -> (whether this node of it runs natively, the lowering that adds its calls to a plan)
LOWERINGS = {
    "fused": (lambda node: True, _fused),
    "fused_reduce": (lambda node: True, _fused_reduce),
    "fused_linear": (lambda node: True, linear),
    "attention": (lambda node: True, attention),
    "matmul": (lambda node: node.dtype.is_float, _matmul_op),
    "cat": (lambda node: not node.dtype.block, _cat),
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
