"""Lowering the products: matmul (x @ W, any float types) and fused_linear (ops.linear: an
RMSNorm prologue, several weights, an epilogue, block-quantised weights met in 8 bits) into
calls of the kernels in codegen.py, column_lanes.py and few_rows.py (quantised.py: x in 8 bits), split
over the threads."""
import os
from functools import partial
from typing import NamedTuple

import numpy as np

import ops
from backends.llvm import codegen, column_lanes, few_rows, signatures, threads
from backends.llvm.plan import elementwise, kernel, reduction
from backends.llvm.quantised import quantize_rows_kernel
from backends.llvm.target import vector_registers
from ops import dtypes
from ops import linear as linear_ops
from ops.blocks import BLOCK

def lane_rows(w_types, lanes: int) -> int:
    """x rows per step of the column-lane kernels (8 and 16 lanes ran 1.6x the 4 x 4 block_sums
    at 64 rows). More rows share each step's transposing of the weights: 16 ran 1.04-1.12x 12
    on 1B Q4_K_M, Q6_K and Q8_0 at 64, 96, 100 and 128 rows, AVX2 and AVX-512 VNNI alike (12
    ran 0.9-1.3x 8), except for the 4-bit simple formats in 16 lanes, whose float work per
    block (a scale and an offset per row) then spills: there 12 ran 1.13x 16 (1B Q4_0). But
    13 to 16 rows in all go as one step: for them 12 and a rest read the weights twice (a batch
    of 13-16 decode steps, 8192 x 2048 Q4_0: 13/16 rows 1.45-1.51/1.50-1.62 ms in two steps,
    1.03-1.06/1.16-1.22 in one, Emerald Rapids, 2 threads)."""
    simple_4_bit = any(t.block.sub_blocks == 1 and t.block.bits == 4 for t in w_types)
    return 12 if lanes == 16 and simple_4_bit else 16


def _block(m: int, weights: int = 1, pairs: bool = False):
    """Rows x columns of C per step, with float weights. 4 x 3 keeps 12 accumulators and 7 loads in
    AVX2's 16 registers (measured best at 128 rows); with 32 registers (AVX-512) 4 x 6 (24
    accumulators) measured 1.1-1.4x faster with float16/float32 weights at 8-512 rows; bfloat16
    weights read in pairs (codegen.pair_major) hold two rows of A per row, and 4 x 5 (20
    accumulators, 8 rows of A) ran 1.2-1.35x 4 x 6 (64 x 8192 x 2048, alternating); in 16
    registers 2 x 4 ran 1.75x 4 x 3 (1B BF16 prefill, 64 rows, avx2), 3 x 3 and 2 x 5 alike.
    With two weights (SwiGLU) each column needs two accumulators: with 16 registers 4 x 1 measured 1.5x
    faster than 3 x 2, which spills; with 32, 4 x 3 1.4-2.1x faster than 4 x 1. One row streams
    4 weight rows at a time."""
    wide = vector_registers() >= 32
    if weights == 1 and m >= 4 and pairs and not wide:
        return (2, 4)
    if weights == 1:
        return (1, 4) if m < 4 else (4, (5 if pairs else 6) if wide else 3)
    return (1, 2) if m < 4 else (4, 3 if wide else 1)


def batch_invariant() -> bool:
    """Whether a row's products are the same bits however many rows came with it (the default):
    block products of a few rows then take the column-lane kernel's float order (few_rows.py),
    which costs decode speed where the weights do not stream slower than it sums across lanes
    (docs/performance.md). TT_BATCH_INVARIANT=0 trades that away: they then take the one-row
    kernel (quantised.block_sums), and a token's logits depend on the batch it came in (a cached
    prefix, a chunked prompt, the server's batch)."""
    value = os.environ.get("TT_BATCH_INVARIANT", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"TT_BATCH_INVARIANT={value!r}: give 1 (the default: logits that do not depend on "
                         f"the batch) or 0 (faster decode)")
    return value == "1"


def _block_tiles(m: int, n: int, w_types) -> list[tuple[range, int, range, int]]:
    """(rows, rows per step, columns, columns per step) covering C, with block weights: a
    column per vector lane, the last step's lanes past n reading the last column again. Rows
    go in steps of lane_rows through the column-lane kernel where it reads the formats, the
    rows left in one more step of their own number (see column_lane_rest), then the one or
    two left (a decode step) through few_rows.py (its COLUMNS at a time), in the same order
    of float operations per row."""
    if m < 4 and not batch_invariant():
        return [(range(m), 1, range(n), 1)]
    lanes = column_lanes.columns() if column_lanes.reads(w_types) else 0
    row_steps, start = [], 0
    if lanes:
        step = lane_rows(w_types, lanes)
        if step < m <= lanes:  # no more rows than lanes: one step of them all (see lane_rows)
            step = m
        start = m // step * step
        row_steps.append((range(start), step, lanes))
        if m - start >= column_lane_rest(w_types):
            row_steps.append((range(start, m), m - start, lanes))
            start = m
    else:
        start = m // 4 * 4
        row_steps.append((range(start), 4, few_rows.COLUMNS))
    row_steps.append((range(start, m), m - start, few_rows.COLUMNS))
    return [(rows, step, cols, columns) for rows, step, columns in row_steps
            for cols in (range(n - n % columns), range(n - n % columns, n))]


def column_lane_rest(w_types) -> int:
    """The fewest rows left after the lane_rows steps (a batch of decode steps, a prefill's
    last rows) that go through the column-lane kernel as one step: it transposes the weights
    it reads once for all of them, where few_rows.py sums each row apart. One step of all of
    them, against steps of 4 and the rest through few_rows, 8192 x 2048 weights, 2 threads,
    Emerald Rapids (AVX-512 VNNI), ms at 3/5/8/11 rows: Q4_0 0.65/0.74/0.79/1.40 ->
    0.49/0.47/0.56/0.75, Q4_K 0.56/0.60/0.72/1.24 -> 0.56/0.42/0.54/0.71, Q6_K
    0.68/1.19/1.60/2.26 -> 0.66/0.93/1.10/1.23, Q8_0 0.39/0.77/0.96/1.32 -> 0.40/0.54/0.68/0.85;
    at the AVX2 level, Q6_K at 8 rows 2.31 -> 1.47. At 2 rows few_rows is the faster (Q4_K
    0.36 against 0.43) but for the simple 4-bit formats (Q4_0 0.48 against 0.39)."""
    simple_4_bit = all(t.block.sub_blocks == 1 and t.block.bits == 4 for t in w_types)
    return 2 if simple_4_bit else 3


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
    fn = kernel(("quantize_rows", group), lambda name: quantize_rows_kernel(name, group), signatures.QUANTIZE_ROWS)
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
    """Llama's RMSNorm of x's rows (ops.linear.rms_norm_programs), into a new array."""
    f32 = dtypes.float32
    m, k = x.shape
    squares, scale = linear_ops.rms_norm_programs(k, eps, g_type)
    total, normed = np.empty((m, 1), np.float32), np.empty((m, k), np.float32)
    plan.keep += [total, normed]
    reduction(plan, "sum", squares, [x], [f32], (1,), total, f32)
    elementwise(plan, scale, [x, np.broadcast_to(total, (m, k)), np.broadcast_to(g, (m, k))], [f32, f32, g_type],
                normed, f32)
    return normed


def _matmul_nt(A, W, C, a_type, w_types, c_type, threaded, E=(), e_types=(), program=()):
    """Groups of calls (each group one kernel split across threads when `threaded`) computing
    C = epilogue(A @ W[0].T, ..., E...): with float weights the row and column tails get their
    own kernels; block weights are tiled by _block_tiles."""
    m, k, n = A.shape[0], A.shape[1], C.shape[1]
    quantised = any(t.block for t in w_types)
    if quantised:
        tiles = _block_tiles(m, n, w_types)
    else:
        mr, nr = _block(m, len(W), codegen.pair_major(w_types))
        rows, nb = m - m % mr, n - n % nr
        tiles = [(r, r_step, c, c_step) for r, r_step in ((range(rows), mr), (range(rows, m), 1))
                 for c, c_step in ((range(nb), nr), (range(nb, n), 1))]
    groups = []
    for rows, row_block, cols, col_block in tiles:
        if len(rows) and len(cols):
            # block kernels are built for their K and weights' strides (codegen.matmul_nt_kernel)
            fixed = (k, tuple(_leading(w) for w in W)) if quantised else None
            partial = quantised and col_block > 1 and len(cols) < col_block
            key = ("nt", a_type, tuple(w_types), c_type, row_block, col_block, tuple(e_types), program, fixed, partial)
            fn = kernel(key, lambda name: codegen.matmul_nt_kernel(name, a_type, w_types, c_type, row_block,
                                                                    col_block, e_types, program, fixed=fixed,
                                                                    partial=partial),
                         signatures.matmul_nt(len(W), len(E), quantised))
            work = len(cols) * sum(w.strides[0] for w in W) if threaded else 0  # bytes of weights
            weights = [x for w in W for x in (w.ctypes.data + cols.start * w.strides[0], _leading(w))]
            extras = [x for e in [C, *E] for x in (e.ctypes.data + rows.start * e.strides[0] + cols.start * e.itemsize,
                                                    _leading(e))]
            groups.append(threads.split(fn, len(cols), col_block, work, len(rows), k, *_row_args(A, rows.start),
                                        *weights, *extras))
    return groups


def _matmul_nn(A, B, C, a_type, b_type, c_type, m, n, k, threaded):
    if c_type != dtypes.float32:  # the row kernel accumulates in C itself: float32 only
        return [[lambda: np.copyto(C, ops.run_reference("matmul", [A, B], [a_type, b_type], None, C.shape, c_type))]]
    fn = kernel(("nn", a_type, b_type), lambda name: codegen.matmul_nn_kernel(name, a_type, b_type),
                 signatures.MATMUL_NN)
    return [threads.split(fn, m, 1, m * n * k if threaded else 0, n, k, A.ctypes.data, _leading(A),
                          B.ctypes.data, _leading(B), C.ctypes.data, _leading(C))]
