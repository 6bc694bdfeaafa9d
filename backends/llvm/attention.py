"""The fused attention kernel, on the kernel-building layer (kernel.py)."""
import contextlib

from backends.llvm import signatures
from backends.llvm.emitter import float_literal
from backends.llvm.kernel import Kernel
from backends.llvm.target import float_lanes
from ops import dtypes

ATTENTION_BLOCK = 16  # keys whose scores are held at once: the online softmax rescales once per block
NEG_INF = "0xFFF0000000000000"
F32 = dtypes.float32


def attention_kernel(name: str, rows: int, scale: float, mask_kind) -> str:
    """out = softmax(q k^T * scale + mask) v for a tile of `rows` query rows at a time that share
    one k and v (the query heads of a grouped-query head, times the query positions), with an
    online softmax over blocks of keys: no score matrix is stored, each k and v row is loaded
    once per tile, and keys that no row of the tile may see are skipped without being read (a
    block of them whole, at the cost of or-ing its mask: a decode step's cache is mostly
    positions not yet written).

    void name(i64 r0, i64 r1, ptr table, ptr K, i64 ldk, ptr V, i64 ldv, i64 S, i64 D, i64 DV,
    i64 mstride): rows r0..r1 (a multiple of `rows`) of table, whose row i holds the addresses of
    its q row, out row and mask row (mask elements mstride apart along the keys)."""
    R, KB = rows, ATTENTION_BLOCK
    k = Kernel(name, signatures.ATTENTION)
    acc = k.scratch("float", k.mul("%DV", R))  # row r's output accumulator at acc[r * DV:]
    scores = k.scratch("float", R * KB)        # row r's scores of the block at scores[r * KB:]
    peaks, sums = k.scratch("float", R), k.scratch("float", R)  # each row's running max and sum

    def acc_at(x, r):
        return k.at(acc, k.add(x, k.mul("%DV", r)))

    with k.loop("%r0", "%r1", step=R, hint="tile") as t:
        q, out, mask = [], [], []  # each row's addresses, from the table
        for r in range(R):
            desc = k.at("%table", k.mul(k.add(t, r), 3), "i64")
            q.append(k.op(f"load ptr, ptr {desc}"))
            out.append(k.op(f"load ptr, ptr {k.at(desc, 1, 'i64')}"))
            mask.append(k.op(f"load ptr, ptr {k.at(desc, 2, 'i64')}"))
            k.store(NEG_INF, k.at(peaks, r), F32)
            k.store("0.0", k.at(sums, r), F32)
        with k.loop("0", k.mul("%DV", R), hint="zero") as x:
            k.store("0.0", k.at(acc, x), F32)

        with k.loop("0", "%S", step=KB, hint="block") as j0:
            jn = k.op(f"call i64 @llvm.smin.i64(i64 {k.op(f'sub i64 %S, {j0}')}, i64 {KB})")
            live = contextlib.nullcontext() if mask_kind != "bool" else \
                k.when(_block_seen(k, mask, j0, jn), hint="live")
            # a block no row may see is skipped: gone through, its weights would be 0 (exp clamps
            # -inf to -104, which underflows) and its rescaling exp(0) = 1, the same bits
            with live:
                with k.loop("0", jn, hint="scores") as jj:  # the block's scores, -inf where masked
                    key = k.add(j0, jj)
                    seen = [_visible(k, mask[r], key, mask_kind) for r in range(R)]
                    with k.when(_any(k, seen), hint="dot") as visible:
                        dots = _dot_rows(k, q, k.mul(key, "%ldk"))
                    for r in range(R):
                        s = k.op(f"fmul float {visible.join(dots[r], '0.0')}, {float_literal(scale)}")
                        if mask_kind == "add":
                            bias = k.op(f"load float, ptr {_mask_at(k, mask[r], key, 'float')}")
                            s = k.op(f"fadd float {s}, {bias}")
                        s = k.op(f"select i1 {seen[r]}, float {s}, float {NEG_INF}")
                        k.store(s, k.at(scores, k.add(jj, r * KB)), F32)

                # fold the block into each row's running max, sum and accumulator
                corrections = []
                for r in range(R):
                    old = k.op(f"load float, ptr {k.at(peaks, r)}")
                    peak = _fold(k, scores, r * KB, jn, old, lambda m, s: (
                        k.op(f"call float @llvm.maximum.f32(float {m}, float {k.op(f'load float, ptr {s}')})")))
                    dead = k.op(f"fcmp oeq float {peak}, {NEG_INF}")  # nothing seen yet: keep zeros
                    corrections.append(k.op(f"select i1 {dead}, float 1.0, float {k.exp(k.op(f'fsub float {old}, {peak}'))}"))

                    with k.loop("0", jn, hint="exp", nonempty=True) as i:  # scores = exp(scores - peak), 0 when dead
                        s = k.at(scores, k.add(i, r * KB))
                        p = k.exp(k.op(f"fsub float {k.op(f'load float, ptr {s}')}, {peak}"))
                        k.store(k.op(f"select i1 {dead}, float 0.0, float {p}"), s, F32)
                    # their sum in key order (no reassociation: a block cut short by the end of the
                    # keys must add its first scores as a whole one does), apart from the exps so
                    # that those still vectorise
                    total = _fold(k, scores, r * KB, jn, "0.0", lambda t, s: k.op(f"fadd float {t}, {k.op(f'load float, ptr {s}')}"))
                    kept = k.op(f"fmul float {k.op(f'load float, ptr {k.at(sums, r)}')}, {corrections[r]}")
                    k.store(k.op(f"fadd float {kept}, {total}"), k.at(sums, r), F32)
                    k.store(peak, k.at(peaks, r), F32)
                with k.loop("0", "%DV", hint="rescale") as x:
                    for r in range(R):
                        at = acc_at(x, r)
                        k.store(k.op(f"fmul float {k.op(f'load float, ptr {at}')}, {corrections[r]}"), at, F32)
                with k.loop("0", jn, hint="accumulate") as jj:  # acc += p v, for keys some row gives weight
                    ps = [k.op(f"load float, ptr {k.at(scores, k.add(jj, r * KB))}") for r in range(R)]
                    vrow = k.mul(k.add(j0, jj), "%ldv")
                    with k.when(_any(k, [k.op(f"fcmp une float {p}, 0.0") for p in ps]), hint="weighted"):
                        with k.loop("0", "%DV", hint="axpy", nonempty=True) as x:
                            v = k.op(f"load float, ptr {k.at('%V', k.add(vrow, x))}")
                            for r in range(R):
                                at = acc_at(x, r)
                                k.store(k.fma(ps[r], v, k.op(f"load float, ptr {at}")), at, F32)

        totals = [k.op(f"load float, ptr {k.at(sums, r)}") for r in range(R)]
        with k.loop("0", "%DV", hint="write") as x:  # out = acc / sum
            for r in range(R):
                a = k.op(f"load float, ptr {acc_at(x, r)}")
                k.store(k.op(f"fdiv float {a}, {totals[r]}"), k.at(out[r], x), F32)
    return k.finish()

def _block_seen(k, mask, j0, jn) -> str:
    """Whether any row of the tile may see a key of the block j0 .. j0 + jn - 1 (a boolean
    mask): the elements or-ed, 16 at a time where the block is whole and the mask's keys lie
    side by side (a decode step's cache is mostly positions not yet written, each skipped at
    this cost), else one by one."""
    whole = k.op(f"and i1 {k.op(f'icmp eq i64 {jn}, {ATTENTION_BLOCK}')}, {k.op('icmp eq i64 %mstride, 1')}")
    with k.when(whole, hint="seen16") as wide:
        bytes_ = f"<{ATTENTION_BLOCK} x i8>"
        either = "zeroinitializer"
        for row in mask:
            either = k.op(f"or {bytes_} {either}, {k.vload(k.at(row, j0, 'i8'), ATTENTION_BLOCK, 'i8')}")
        fast = k.op(f"call i8 @llvm.vector.reduce.or.v{ATTENTION_BLOCK}i8({bytes_} {either})")
    with k.when(k.op(f"xor i1 {whole}, true"), hint="seen1") as narrow:
        with k.loop("0", jn, hint="key", nonempty=True) as jj:
            seen = k.carry("0", "i8")
            value = seen.value
            for row in mask:
                element = k.op(f"load i8, ptr {_mask_at(k, row, k.add(j0, jj), 'i8')}")
                value = k.op(f"or i8 {value}, {element}")
            seen.set(value)
    either = k.op(f"or i8 {wide.join(fast, '0', 'i8')}, {narrow.join(seen.final, '0', 'i8')}")
    return k.op(f"icmp ne i8 {either}, 0")


def _mask_at(k, mask_row, key, storage) -> str:
    """The address of this key's element in a row of the mask."""
    return k.at(mask_row, k.mul(key, "%mstride"), storage)


def _visible(k, mask_row, key, mask_kind) -> str:
    """Whether this row may see this key: a boolean mask's element, else always."""
    if mask_kind != "bool":
        return "true"
    element = k.op(f"load i8, ptr {_mask_at(k, mask_row, key, 'i8')}")
    return k.op(f"icmp ne i8 {element}, 0")


def _any(k, flags) -> str:
    result = flags[0]
    for f in flags[1:]:
        result = k.op(f"or i1 {result}, {f}")
    return result


def _dot_rows(k, q, krow) -> list[str]:
    """sum_d q[r][d] * K[krow + d] for every row r: one pass over the k row, R accumulators, each
    in the same float order whatever R is (as codegen._sums: lanes of partial sums, a fixed
    tree, then the last D % lanes one by one), so that a row's scores do not depend on the
    rows that share its tile."""
    lanes = float_lanes()
    vec = f"<{lanes} x float>"
    whole = k.op(f"and i64 %D, {-lanes}")
    with k.loop("0", whole, step=lanes, hint="d") as d:
        kv = k.vload(k.at("%K", k.add(krow, d)), lanes, "float")
        sums = []
        for row in q:
            s = k.carry("zeroinitializer", vec)
            s.set(k.fma(k.vload(k.at(row, d), lanes, "float"), kv, s.value, vec))
            sums.append(s)
    totals = [k.tree_sum(s.final, lanes) for s in sums]
    with k.loop(whole, "%D", hint="dtail") as d:
        kv = k.op(f"load float, ptr {k.at('%K', k.add(krow, d))}")
        sums = []
        for row, total in zip(q, totals):
            s = k.carry(total)
            s.set(k.fma(k.op(f"load float, ptr {k.at(row, d)}"), kv, s.value))
            sums.append(s)
    return [s.final for s in sums]


def _fold(k, scores, base, count, start, step) -> str:
    """Fold scores[base : base + count] (count >= 1) into a value from `start`:
    step(value, address of the score) -> the next value."""
    with k.loop("0", count, hint="fold", nonempty=True) as i:
        value = k.carry(start)
        value.set(step(value.value, k.at(scores, k.add(i, base))))
    return value.final
