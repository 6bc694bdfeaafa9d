"""The kernels, each written as its loop nest on the kernel-building layer (kernel.py).

- elementwise_kernel / reduce_kernel: a fused program (ops.fused) over a loop nest of any rank,
  optionally reducing the innermost axis. Strides are in elements; the innermost stride of each
  operand is baked in when it is 0 or 1, so the loop vectoriser sees a unit-stride or broadcast
  stream.
- matmul_nt_kernel: x @ W.T, blocked mr rows x nr weight rows, with the fusions' epilogue.
- matmul_nn_kernel: p @ v, a vectorised multiply-add per row.
- attention_kernel: online-softmax attention over blocks of keys (attention.py).
"""
from backends.llvm import column_lanes, few_rows, signatures
from backends.llvm.emitter import STORAGE, compute_type, evaluate
from backends.llvm.few_rows import few_row_sums
from backends.llvm.kernel import Kernel
from backends.llvm.quantised import block_sums
from backends.llvm.target import float_lanes
from ops import dtypes


def elementwise_kernel(name: str, program, in_types, out_type, rank: int, inner_strides) -> str:
    """void name(i64 start, i64 end, ptr dims, ptr strides, ptr out, ptr in0, ...): the
    outermost axis runs from start to end (a thread's share); strides[j * rank + d] is operand
    j's stride (j = 0 is the output) along axis d."""
    return _loop_kernel(name, program, in_types, out_type, rank, inner_strides, reduce=None)


def reduce_kernel(name: str, program, in_types, out_type, rank: int, inner_strides, reduce: str) -> str:
    """Like elementwise_kernel, but the innermost axis is reduced (sum, max or min) into one
    output element per outer index: the output's innermost stride is ignored."""
    return _loop_kernel(name, program, in_types, out_type, rank, inner_strides, reduce=reduce)


def _loop_kernel(name, program, in_types, out_type, rank, inner_strides, reduce):
    types = [out_type, *in_types]
    k = Kernel(name, signatures.loop(len(types)))
    dims = [k.load_at("%dims", d, dtypes.int64) for d in range(rank)]
    stride = {(j, d): str(inner_strides[j]) if d == rank - 1 and inner_strides[j] is not None
              else k.load_at("%strides", j * rank + d, dtypes.int64)
              for j in range(len(types)) for d in range(rank)}

    def nest(d, base):  # loop d over its axis, from each operand's offset `base`
        with k.loop(*(("%start", "%end") if d == 0 else ("0", dims[d])), hint=f"axis{d}") as i:
            offsets = [k.add(base[j], k.mul(i, stride[j, d])) for j in range(len(types))]
            if d < rank - 1:
                nest(d + 1, offsets)
                return
            value = evaluate(k, program, in_types, [k.load_at(f"%p{j}", offsets[j], types[j])
                                                    for j in range(1, len(types))])
            if reduce:
                acc = k.carry(_identity(reduce, out_type), compute_type(out_type))
                acc.set(k.op(_combine(reduce, acc.type, acc.value, value)))
            else:
                k.store_at(value, "%p0", offsets[0], out_type)
        if reduce:
            k.store_at(acc.final, "%p0", base[0], out_type)

    nest(0, ["0"] * len(types))
    return k.finish()


def _identity(reduce, d) -> str:
    t = compute_type(d)
    if reduce == "sum":
        return "0.0" if t == "float" else "0"
    if t == "float":
        return "0xFFF0000000000000" if reduce == "max" else "0x7FF0000000000000"
    if t == "i1":
        return "false" if reduce == "max" else "true"
    bits = {"i8": 8, "i32": 32, "i64": 64}[t]
    return str(-(1 << (bits - 1))) if reduce == "max" else str((1 << (bits - 1)) - 1)


def _combine(reduce, t, acc, value) -> str:
    if reduce == "sum":
        # reassoc lets LLVM keep several partial sums in vector registers
        return f"fadd reassoc {t} {acc}, {value}" if t == "float" else f"add {t} {acc}, {value}"
    if t == "float":
        return f"call float @llvm.{'maximum' if reduce == 'max' else 'minimum'}.f32(float {acc}, float {value})"
    if t == "i1":
        return f"{'or' if reduce == 'max' else 'and'} i1 {acc}, {value}"
    return f"call {t} @llvm.s{reduce}.{t}({t} {acc}, {t} {value})"


# ---- matrix products ------------------------------------------------------------------------------

def matmul_nt_kernel(name: str, a_type, w_types, c_type, mr: int, nr: int, extra_types=(), program=(),
                     target=None, fixed=None, partial=False) -> str:
    """C[m, n] = epilogue(sum_k A[m, k] * W1[n, k], ..., sum_k A[m, k] * Wj[n, k], E1[m, n], ...):
    A and every W run along k with unit stride, the form of x @ W.T with PyTorch-layout weights.
    Each step computes an mr x nr block of C from mr rows of A and nr rows of each weight, so
    every weight element loaded feeds mr multiply-adds; each sum keeps one float order whatever
    mr and nr are (float weights: _float_blocks; block weights: column_lanes for 4 or more rows, few_rows
    for fewer, the same chain per column), so a row's products do not depend on the rows beside
    it. With M = 1 (decode) this streams each weight row exactly once. The epilogue program
    (ops.fused) reads the j products then the extras, and runs as each element is stored; none
    means the first product.

    void name(i64 n0, i64 n1, i64 M, i64 K, ptr A, i64 lda, (ptr W, i64 ldw) x j, ptr C, i64 ldc,
    (ptr E, i64 lde) x extras): columns n0..n1 (a multiple of nr, but see `partial`) and all M rows
    (a multiple of mr). Block weights take nr = one column per lane (few_rows.COLUMNS or
    column_lanes.columns), or nr = 1: TT_BATCH_INVARIANT=0's one-row kernel, quantised.block_sums.
    With bfloat16 weights A's rows must be pair-major (see pair_major). Block-quantised weights
    (all of them or none; their leading dimension in bytes) meet A as q8 blocks (quantised.py);
    `target` picks the integer dot product's instructions (the host by default). `fixed`, (K,
    (ldw, ...)), builds those in as constants, ignoring the arguments: the column-lane kernels
    read 16 weight rows and 12 or 16 rows of A at once, and with their distances known every
    address is one base register plus a constant (with them unknown, 40-odd pointers spilled to
    the stack). `partial`: block weights' last columns, n1 - n0 < nr of them, whose lanes past
    n1 read its last column again and store nothing (apart from the whole steps, whose column
    addresses stay constants)."""
    quantised = any(t.block for t in w_types)
    assert not quantised or all(t.block for t in w_types), "one kernel reads blocks or floats, not both"
    assert not quantised or nr in (1, few_rows.COLUMNS, column_lanes.columns(target)), "one column per lane"
    k = Kernel(name, signatures.matmul_nt(len(w_types), len(extra_types), quantised))
    block = [(i, r, c) for i in range(len(w_types)) for r in range(mr) for c in range(nr)]
    if not quantised:
        _float_blocks(k, a_type, w_types, c_type, mr, nr, block, extra_types, program, target)
        return k.finish()
    lanes = mr >= 4 and column_lanes.reads(w_types, target)
    scales = column_lanes.scratch(k, w_types, nr) if nr > 1 else ()
    ldw = [str(x) for x in fixed[1]] if fixed else [f"%ldw{i}" for i in range(len(w_types))]
    depth = str(fixed[0]) if fixed else "%K"
    with k.loop("%n0", "%n1", step=nr, hint="n") as n:
        index = [k.add(n, c) for c in range(nr)]
        if partial:  # lanes past n1 read column n1 - 1 again and store nothing
            last = k.op("sub i64 %n1, 1")
            index = [k.op(f"call i64 @llvm.smin.i64(i64 {x}, i64 {last})") for x in index]
        with k.loop("0", "%M", step=mr, hint="m") as m:
            cols = [[k.mul(x, ldw[i]) for x in index] for i in range(len(w_types))]
            rows = [k.add(m, r) for r in range(mr)]
            if lanes:
                sums = column_lanes.column_lane_sums(k, w_types, rows, cols, target, depth, scales)
            elif nr == 1:  # TT_BATCH_INVARIANT=0's one-row kernel (products.batch_invariant)
                sums = block_sums(k, w_types, rows, cols, block, target)
            else:
                sums = few_row_sums(k, w_types, rows, cols, [k.mul(x, nr) for x in ldw], target, depth, scales)
            for r, row in enumerate(rows):
                for c in range(nr):
                    col = k.add(n, c)
                    if not partial:
                        _store(k, sums, row, col, r, c, len(w_types), extra_types, program, c_type)
                        continue
                    with k.when(k.op(f"icmp slt i64 {col}, %n1"), hint="column"):
                        _store(k, sums, row, col, r, c, len(w_types), extra_types, program, c_type)
    return k.finish()


def _store(k, sums, row, col, r, c, weights, extra_types, program, c_type):
    """C[row, col] = the epilogue of the block's (r, c) products and the extras there."""
    extras = [k.load_at(f"%E{x}", k.add(k.mul(row, f"%lde{x}"), col), t) for x, t in enumerate(extra_types)]
    products = [sums[i, r, c] for i in range(weights)]
    value = evaluate(k, program, [dtypes.float32] * weights + list(extra_types), products + extras) \
        if program else products[0]
    k.store_at(value, "%C", k.add(k.mul(row, "%ldc"), col), c_type)


# The float products' blocking: a thread's columns go PANEL_COLUMNS at a time, its rows
# PANEL_ROWS at a time, and K in chunks of CHUNK values, so that an mr x nr step's rows of A and
# of the weights (CHUNK values each, 20 KB at 4 x 6) stay in L1 across the steps that reuse the
# weights' rows, and the panel's rows of A in L2 across its columns. The vector accumulators of
# the unfinished blocks wait between chunks in a scratch on the stack (96 x 96 at 4 x 6: 590 KB).
# Each sum is the same float operations as in one pass over K (see _chunk_sums): the blocking
# changes no bit. Before it, each column step read all of A's rows again from L3 or memory and a
# step's 10 rows of 1,280+ floats did not fit L1: 6432 x 1280 x 1280 float32 ran at 149 GFLOP/s,
# now 225-275 (x 5120 deep 230-275; 2 threads, Emerald Rapids; 48 x 48 x 256 ran 208-236, 96 x
# 96 x 1024 alike, 6 x 4 steps 222-242).
PANEL_ROWS, PANEL_COLUMNS, CHUNK = 96, 96, 512


def _float_blocks(k, a_type, w_types, c_type, mr, nr, block, extra_types, program, target):
    """matmul_nt_kernel's loops for float weights; block: the (weight, row, column) sums of a step."""
    lanes = float_lanes(target)
    vec = f"<{lanes} x float>"
    pairs = pair_major(w_types)
    rows_per_panel, cols_per_panel = PANEL_ROWS // mr * mr, max(PANEL_COLUMNS // nr, 1) * nr
    length = k.op("ashr i64 %K, 1") if pairs else "%K"
    whole = k.op(f"and i64 {length}, {-lanes}")
    smin = lambda a, b: k.op(f"call i64 @llvm.smin.i64(i64 {a}, i64 {b})")  # noqa: E731
    chunks = k.op(f"call i64 @llvm.smax.i64(i64 {whole}, i64 1)")  # K < lanes: one empty chunk, then the tail
    # one row a step (a decode step, a few rows left over) reuses no row of the weights: each
    # weight row streams whole, once, as the memory-bound pass wants
    chunk = CHUNK if mr > 1 else chunks
    scratch = k.op(f"alloca {vec}, i64 {rows_per_panel // mr * (cols_per_panel // nr) * len(block)}, align 64") \
        if mr > 1 else None
    with k.loop("0", "%M", step=rows_per_panel, hint="panel") as p0, \
            k.loop("%n0", "%n1", step=cols_per_panel, hint="cpanel") as c0, \
            k.loop("0", chunks, step=chunk, hint="chunk") as k0:
        p1, c1, k1 = smin(k.add(p0, rows_per_panel), "%M"), smin(k.add(c0, cols_per_panel), "%n1"), \
            smin(k.add(k0, chunk), whole)
        first, last = k.op(f"icmp eq i64 {k0}, 0"), k.op(f"icmp eq i64 {k1}, {whole}")
        with k.loop(c0, c1, step=nr, hint="n") as n, k.loop(p0, p1, step=mr, hint="m") as m:
            cols = [[k.mul(k.add(n, c), f"%ldw{i}") for c in range(nr)] for i in range(len(w_types))]
            rows = [k.add(m, r) for r in range(mr)]
            a_rows = [k.mul(row, "%lda") for row in rows]
            if scratch:
                at = k.mul(k.add(k.mul(k.op(f"sdiv i64 {k.op(f'sub i64 {n}, {c0}')}, {nr}"), str(rows_per_panel // mr)),
                                 k.op(f"sdiv i64 {k.op(f'sub i64 {m}, {p0}')}, {mr}")), str(len(block)))
                slot = {x: k.op(f"getelementptr {vec}, ptr {scratch}, i64 {k.add(at, j)}") for j, x in enumerate(block)}
                start = {x: k.op(f"select i1 {first}, {vec} zeroinitializer, "
                                 f"{vec} {k.op(f'load {vec}, ptr {slot[x]}, align 64')}") for x in block}
            else:
                start = dict.fromkeys(block, "zeroinitializer")
            acc = _chunk_sums(k, a_type, w_types, a_rows, cols, block, start, k0, k1, lanes, pairs)
            with k.when(last, hint="last"):
                sums = _finish_sums(k, a_type, w_types, a_rows, cols, block, acc, whole, length, lanes, pairs)
                for r, row in enumerate(rows):
                    for c in range(nr):
                        _store(k, sums, row, k.add(n, c), r, c, len(w_types), extra_types, program, c_type)
            if scratch:
                with k.when(k.op(f"xor i1 {last}, true"), hint="more"):
                    for x in block:
                        k.raw(f"  store {vec} {acc[x]}, ptr {slot[x]}, align 64")


def _chunk_sums(k, a_type, w_types, rows, cols, block, start, k0, k1, lanes, pairs):
    """{(weight, row, col): the vector of lane partial sums} after values k0..k1 (a multiple of
    lanes; pairs with bfloat16 weights), from `start`: lane j adds the values j, j + lanes, ...
    in order, whatever the chunks."""
    vec = f"<{lanes} x float>"
    with k.loop(k0, k1, step=lanes, hint="k") as kk:
        acc = {x: k.carry(start[x], vec) for x in block}
        terms = _pair_terms(k, a_type, rows, cols, kk, lanes) if pairs else \
            _terms(k, a_type, w_types, rows, cols, kk, lanes)
        # bfloat16 pairs column by column: a column's two widened halves are then live only while
        # its rows take them, not every column's across all rows (spilled at 4 x 6)
        for i, r, c in sorted(block, key=lambda x: (x[0], x[2], x[1])) if pairs else block:
            total = acc[i, r, c].value
            for x, y in terms[i][r][c]:
                total = k.fma(x, y, total, vec)
            acc[i, r, c].set(total)
    return {x: acc[x].final for x in block}


def _finish_sums(k, a_type, w_types, rows, cols, block, acc, whole, length, lanes, pairs):
    """The sums: each vector's lanes added in a fixed tree (target.float_lanes), then the last
    K - K % lanes values one by one (then, bfloat16 pairs with an odd K, the last one)."""
    sums = {x: k.tree_sum(acc[x], lanes) for x in block}
    with k.loop(whole, length, hint="tail") as kk:
        carried = {x: k.carry(sums[x]) for x in block}
        terms = _pair_terms(k, a_type, rows, cols, kk) if pairs else _terms(k, a_type, w_types, rows, cols, kk)
        for i, r, c in block:
            total = carried[i, r, c].value
            for x, y in terms[i][r][c]:
                total = k.fma(x, y, total)
            carried[i, r, c].set(total)
    sums = {x: carried[x].final for x in block}
    if pairs:  # an odd K leaves one last element
        with k.when(k.op(f"icmp ne i64 {k.op('and i64 %K, 1')}, 0"), hint="tail") as tail:
            last = _terms(k, a_type, w_types, rows, cols, k.op("sub i64 %K, 1"))
            tails = {}
            for i, r, c in block:
                (x, y), = last[i][r][c]
                tails[i, r, c] = k.fma(x, y, sums[i, r, c])
        sums = {x: tail.join(tails[x], sums[x]) for x in block}
    return sums


def pair_major(w_types) -> bool:
    """Whether matmul_nt_kernel reads A's rows pair-major: the even elements of the first
    2 * (K // 2), then the odd ones, then the last one when K is odd."""
    return all(t == dtypes.bfloat16 for t in w_types)


def _terms(k, a_type, w_types, rows, cols, at, lanes: int = 1):
    """[weight][row][col] -> [(a, w)]: the products of element `at` (of elements at.. at + lanes
    - 1 as vectors, with lanes > 1)."""
    def load(ptr, index, d):
        return k.load_at(ptr, index, d) if lanes == 1 else k.vload_floats(k.at(ptr, index, STORAGE[d.name]), lanes, d)
    a = [load("%A", k.add(row, at), a_type) for row in rows]
    w = [[load(f"%W{i}", k.add(col, at), t) for col in cols[i]] for i, t in enumerate(w_types)]
    return [[[[(a[r], w[i][c])] for c in range(len(cols[i]))] for r in range(len(rows))] for i in range(len(w_types))]


def _pair_terms(k, a_type, rows, cols, at, lanes: int = 1):
    """Like _terms for elements 2 at and 2 at + 1 (pairs at.. at + lanes - 1), with bfloat16
    weights read as one i32 per pair. A's rows come pair-major (see pair_major) so that both
    halves load with unit stride."""
    even, odd = k.op(f"shl i64 {at}, 1"), k.add(at, k.op("ashr i64 %K, 1"))
    if lanes == 1:
        a = [[k.load_at("%A", k.add(row, x), a_type) for x in (at, odd)] for row in rows]
        w = [[k.load_bf16_pairs(k.at(f"%W{i}", k.add(col, even), "i16")) for col in weight] for i, weight in enumerate(cols)]
    else:
        a = [[k.vload_floats(k.at("%A", k.add(row, x), STORAGE[a_type.name]), lanes, a_type) for x in (at, odd)]
             for row in rows]
        w = [[k.load_bf16_pairs(k.at(f"%W{i}", k.add(col, even), "i16"), lanes) for col in weight]
             for i, weight in enumerate(cols)]
    return [[[list(zip(a[r], w[i][c])) for c in range(len(cols[i]))] for r in range(len(rows))] for i in range(len(cols))]


def matmul_nn_kernel(name: str, a_type, b_type) -> str:
    """C[m, :] = sum_k A[m, k] * B[k, :] for B with rows of unit stride (p @ v in attention):
    the n loop is a vectorised multiply-add into a float32 row of C.

    void name(i64 m0, i64 m1, i64 N, i64 K, ptr A, i64 lda, ptr B, i64 ldb, ptr C, i64 ldc)"""
    k = Kernel(name, signatures.MATMUL_NN)
    with k.loop("%m0", "%m1", hint="m") as m:
        crow = k.mul(m, "%ldc")
        with k.loop("0", "%N", hint="zero") as n:
            k.store("0.0", k.at("%C", k.add(crow, n)), dtypes.float32)
        with k.loop("0", "%K", hint="k") as kk:
            a = k.load_at("%A", k.add(k.mul(m, "%lda"), kk), a_type)
            brow = k.mul(kk, "%ldb")
            with k.loop("0", "%N", hint="n") as n:
                at = k.at("%C", k.add(crow, n))
                b = k.load_at("%B", k.add(brow, n), b_type)
                total = k.op(f"fadd contract float {k.op(f'load float, ptr {at}')}, {k.op(f'fmul contract float {a}, {b}')}")
                k.store(total, at, dtypes.float32)
    return k.finish()
