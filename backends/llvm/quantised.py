"""The rows of x quantised to 8 bits for the products with block-quantised weights
(ops.blocks.product), as llama.cpp quantises them: once per product, one scale per 32 values or
per 256 for the K-quants. Every weight block then meets every row block in an integer dot
product (column_lanes.py, few_rows.py).

block_sums here is the one-row kernel that TT_BATCH_INVARIANT=0 chooses for a few rows: each
(row, column) pair keeps 8 float lanes of partial sums, added up at the end, an order of its own,
so a row's sums then depend on whether it came alone or in a prefill (products.batch_invariant).
Decode is faster so: no sums across lanes per block."""
from backends.llvm import signatures
from backends.llvm.blocks import reads
from backends.llvm.blocks.dot import LANES, dot, prepare
from backends.llvm.emitter import constant
from backends.llvm.kernel import Kernel
from ops import dtypes
from ops.blocks import BLOCK

F32 = dtypes.float32
FLOATS = f"<{BLOCK} x float>"
VEC = f"<{LANES} x float>"
SHIFT = BLOCK.bit_length() - 1  # K >> SHIFT blocks per row
# Each weight row's bytes are asked for this far ahead of their use: a decode step streams the
# weights once, and the hardware prefetcher alone left it at ~60% of the read bandwidth (a 147 MB
# q4_0 matrix: 9-10 GB/s without, 14-16 GB/s with 2-4 KiB, on 2 threads)
PREFETCH_BYTES = 4096


def quantize_rows_kernel(name: str, group: int = BLOCK) -> str:
    """void name(i64 r0, i64 r1, i64 K, ptr X, i64 ldx, ptr Q, ptr D, ptr S): rows r0..r1 of X
    quantised as ops.blocks.quantize_rows does it for `group` (32, or 256 for the K-quants), one
    float32 operation per step in the same order, so both give the same bits (and the scales of
    32 values rounded to float16 where it rounds them). Q holds q + 128 (unsigned bytes: see
    blocks/dot.py)."""
    k = Kernel(name, signatures.QUANTIZE_ROWS)
    blocks = k.op(f"lshr i64 %K, {SHIFT}")
    per_group = group // BLOCK
    with k.loop("%r0", "%r1", hint="row") as r:
        with k.loop("0", k.op(f"udiv i64 %K, {group}"), hint="groups") as g:
            first = k.mul(g, per_group)  # the group's first block
            x = [k.vload(k.at("%X", k.add(k.mul(r, "%ldx"), k.mul(k.add(first, i), BLOCK))), BLOCK, "float", 4)
                 for i in range(per_group)]
            magnitudes = [k.op(f"call {FLOATS} @llvm.fabs.v32f32({FLOATS} {v})") for v in x]
            while len(magnitudes) > 1:  # the group's largest magnitude: max is exact in any order
                magnitudes = [k.op(f"call {FLOATS} @llvm.maxnum.v32f32({FLOATS} {a}, {FLOATS} {b})")
                              for a, b in zip(magnitudes[::2], magnitudes[1::2])]
            amax = k.op(f"call float @llvm.vector.reduce.fmax.v32f32({FLOATS} {magnitudes[0]})")
            nonzero = k.op(f"fcmp une float {amax}, 0.0")
            inverse = k.op(f"select i1 {nonzero}, float {k.op(f'fdiv float 127.0, {amax}')}, float 0.0")
            if group == BLOCK:
                d = k.op(f"fdiv float {amax}, 127.0")
            else:  # llama.cpp's q8_K keeps the inverse's inverse
                d = k.op(f"select i1 {nonzero}, float {k.op(f'fdiv float 1.0, {inverse}')}, float 0.0")
            for i, v in enumerate(x):
                b = k.add(first, i)
                scaled = k.op(f"fmul {FLOATS} {v}, {k.splat(inverse, BLOCK)}")
                rounded = k.op(f"call {FLOATS} @llvm.roundeven.v32f32({FLOATS} {scaled})")
                q = k.op(f"fptosi {FLOATS} {rounded} to <{BLOCK} x i8>")
                unsigned = k.op(f"xor <{BLOCK} x i8> {q}, {constant(-128, BLOCK)}")
                k.raw(f"  store <{BLOCK} x i8> {unsigned}, ptr {k.at('%Q', k.add(k.mul(r, '%K'), k.mul(b, BLOCK)), 'i8')}, align 1")
                total = k.op(f"call i32 @llvm.vector.reduce.add.v32i32(<{BLOCK} x i32> "
                             f"{k.op(f'sext <{BLOCK} x i8> {q} to <{BLOCK} x i32>')})")
                at = k.add(k.mul(r, blocks), b)
                s = k.op(f"fmul float {d}, {k.op(f'sitofp i32 {total} to float')}")
                if group == BLOCK:  # stored as float16, as ggml's q8_0 and q8_1 (ops.blocks.quantize_rows)
                    d_stored, s = (k.op(f"fpext half {k.op(f'fptrunc float {v} to half')} to float") for v in (d, s))
                else:
                    d_stored = d
                k.store_at(d_stored, "%D", at, F32)
                k.store_at(s, "%S", at, F32)
    return k.finish()


def block_sums(k, w_types, rows, cols, block, target=None):
    """{(weight, row, col): sum_k x[row, k] * W[col, k]} over the q8 blocks of x (the kernel's
    A, AD, AS) and weights in blocks; rows are row indices, cols each weight row's byte offset.
    Each weight (sub-)block is read (and prepared for the dot product) once and multiplied into
    every row of the step. The k loop steps by the largest block (256 values when a K-quant is
    among the weights), reading the smaller ones' blocks in a straight run.

    With one sum (a decode step's matrix-vector product of one weight) its adds make one chain,
    a block apart: there the loop takes two steps at a time into two sets of sums, so that the
    next block's adds need not wait for this one's, and a last loop takes an odd step (SmolLM2
    Q4_1's AVX2 decode: these products 1.47 -> 1.37 ms of the step's 3.92, Emerald Rapids; two
    weights' sums, SwiGLU's, are two chains already and gained nothing)."""
    formats = [t.block for t in w_types]
    read = [reads(f) for f in formats]
    subs = max(f.sub_blocks for f in formats)  # x's blocks per step
    blocks = k.op(f"lshr i64 %K, {SHIFT}")  # x's blocks per row
    minimums = [x for x in block if read[x[0]].block_minimum]
    steps = k.op(f"udiv i64 %K, {subs * BLOCK}")
    ways = 2 if len(block) == 1 else 1
    paired = k.op(f"and i64 {steps}, {-ways}")
    with k.loop("0", paired, step=ways, hint="group") as g:
        sets = [_Sums(k, block, minimums) for _ in range(ways)]
        for way, sums in enumerate(sets):
            _add_step(k, formats, read, rows, cols, subs, blocks, k.add(g, way), sums, target)
    total = _Sums.added(k, sets)
    if ways > 1:
        with k.loop(paired, steps, hint="last") as g:
            last = _Sums(k, block, minimums, total)
            _add_step(k, formats, read, rows, cols, subs, blocks, g, last, target)
        total = _Sums.added(k, [last])
    sums = {x: k.hsum(total.acc[x], LANES) for x in block}
    return {x: k.op(f"fadd float {s}, {total.minimum[x]}") if x in total.minimum else s for x, s in sums.items()}


class _Sums:
    """Each (weight, row, col)'s 8 float lanes, and for the formats with a minimum per block the
    sum of m_w * s_x (a K-quant's go into the lanes, 8 at once): carried around the open loop
    (from `start`'s values, else zero), or, as `added` makes them, plain values."""

    def __init__(self, k, block, minimums, start=None):
        self.acc = {x: k.carry(start.acc[x] if start else "zeroinitializer", VEC) for x in block}
        self.minimum = {x: k.carry(start.minimum[x] if start else "0.0") for x in minimums}

    @classmethod
    def added(cls, k, sets):
        """The sums of the carried sets' final values."""
        total = cls.__new__(cls)
        total.acc = {x: c.final for x, c in sets[0].acc.items()}
        total.minimum = {x: c.final for x, c in sets[0].minimum.items()}
        for other in sets[1:]:
            for x, c in other.acc.items():
                total.acc[x] = k.op(f"fadd reassoc contract {VEC} {total.acc[x]}, {c.final}")
            for x, c in other.minimum.items():
                total.minimum[x] = k.op(f"fadd reassoc contract float {total.minimum[x]}, {c.final}")
        return total


def _add_step(k, formats, read, rows, cols, subs, blocks, g, sums, target):
    """Add step g of the k loop (x's blocks g * subs ..., of `blocks` per row) to `sums`."""
    groups = {}
    for s in range(subs):
        b = k.add(k.mul(g, subs), s)  # x's block
        a = [k.vload(k.at("%A", k.add(k.mul(row, "%K"), k.mul(b, BLOCK)), "i8"), BLOCK, "i8") for row in rows]
        at = [k.add(k.mul(row, blocks), b) for row in rows]
        d_x = [k.splat(k.load_at("%AD", x, F32), LANES) for x in at]
        s_x = [k.load_at("%AS", x, F32) for x in at] if sums.minimum else None
        for i, f in enumerate(formats):
            sub = s % f.sub_blocks
            for c, col in enumerate(cols[i]):
                if sub == 0:  # the weight block's first sub-block: what they share, read once
                    at_w = k.add(col, k.mul(k.op(f"udiv i64 {b}, {f.sub_blocks}"), f.block_bytes))
                    groups[i, c] = _group(k, read[i], k.at(f"%W{i}", at_w, "i8"), at,
                                          [sums.acc[i, r, c] for r in range(len(rows))])
                w = prepare(k, read[i].block(k, groups[i, c], sub), target, f.small, f.unsigned)
                for r in range(len(rows)):
                    products = k.op(f"sitofp <{LANES} x i32> {dot(k, w, a[r], target, f.small, f.unsigned)} to {VEC}")
                    # (sums * d_w) * d_x: a multiply and a fused add (d_w * d_x first became a
                    # scalar multiply and a broadcast per row and column)
                    term = k.op(f"fmul contract {VEC} {k.op(f'fmul {VEC} {products}, {w.d}')}, {d_x[r]}")
                    acc = sums.acc[i, r, c]
                    acc.set(k.op(f"fadd reassoc contract {VEC} {acc.current}, {term}"))
                    if w.m is not None:
                        term = k.op(f"fmul contract float {w.m}, {s_x[r]}")
                        minimum = sums.minimum[i, r, c]
                        minimum.set(k.op(f"fadd reassoc contract float {minimum.current}, {term}"))


def _group(k, read, where, at, accs):
    """A weight block's shared part, read once: its lines prefetched ahead, and (q4_k, q5_k)
    its 8 minimums times the s_x of x's 8 blocks at `at` (one per row) added to each row's
    8-lane sum in one step."""
    for line in range(0, read.f.block_bytes, 64):
        k.prefetch(k.at(where, PREFETCH_BYTES + line, "i8"))
    group = read.group(k, where)
    if group.minimums is not None:
        vec = f"<{LANES} x float>"
        for x, acc in zip(at, accs):
            term = k.op(f"fmul contract {vec} {group.minimums}, {k.vload(k.at('%AS', x), LANES, 'float')}")
            acc.set(k.op(f"fadd reassoc contract {vec} {acc.current}, {term}"))
    return group
