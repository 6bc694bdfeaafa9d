"""The fused attention kernel, on the kernel-building layer (kernel.py)."""
from backends.llvm import signatures
from backends.llvm.emitter import constant, float_literal
from backends.llvm.kernel import Kernel
from backends.llvm.target import float_lanes, vector_registers
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
        q, out, mask = _tile_rows(k, t, R)
        for r in range(R):
            k.store(NEG_INF, k.at(peaks, r), F32)
            k.store("0.0", k.at(sums, r), F32)
        with k.loop("0", k.mul("%DV", R), hint="zero") as x:
            k.store("0.0", k.at(acc, x), F32)

        with k.loop("0", "%S", step=KB, hint="block") as j0:
            jn = k.op(f"call i64 @llvm.smin.i64(i64 {k.op(f'sub i64 %S, {j0}')}, i64 {KB})")
            live = _block_seen(k, mask, j0, jn) if mask_kind == "bool" else "true"
            # a block no row may see is skipped: gone through, its weights would be 0 (exp clamps
            # -inf to -104, which underflows) and its rescaling exp(0) = 1, the same bits
            with k.when(live, hint="live"):
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


def _tile_rows(k, t, R) -> tuple[list[str], list[str], list[str]]:
    """The q, out and mask row addresses of the tile's R rows from row t, from the table."""
    q, out, mask = [], [], []
    for r in range(R):
        desc = k.at("%table", k.mul(k.add(t, r), 3), "i64")
        q.append(k.op(f"load ptr, ptr {desc}"))
        out.append(k.op(f"load ptr, ptr {k.at(desc, 1, 'i64')}"))
        mask.append(k.op(f"load ptr, ptr {k.at(desc, 2, 'i64')}"))
    return q, out, mask


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
    in the same float order whatever R is (as codegen._float_blocks: lanes of partial sums, a fixed
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


def lanes_attention_kernel(name: str, rows: int, scale: float, mask_kind) -> str:
    """attention_kernel's operations, element for element, with the tile's query rows (up to
    float_lanes of them: long prompts, the Vision encoder's 6,432 positions) in the lanes of a
    vector: q transposed once per tile, each key's element broadcast to every row, the online
    softmax on whole vectors, each key's value row added to every row's accumulator at once.
    attention_kernel sums a score across the lanes of a vector, per row and key; here the
    lanes' partial sums are separate vectors, added row-wise in the same tree
    (_dots_in_lane_order), so a row's bits are the same whichever kernel computed it (a decode
    step's few rows take attention_kernel). 2 heads of 2,048 rows x 80, a padding mask, Emerald
    Rapids, 2 threads: 63 -> 130 GFLOP/s. Up to two vectors of rows (32 on AVX-512, 16 with
    AVX2): each key element and value element loaded then feeds two multiply-adds (16 heads of
    6,432 x 6,432 x 80 with the encoder's mask, 2 threads, four alternating runs: 1.54-1.84 s
    with one vector, 1.28-1.60 with two). With AVX2's 16 registers the dot products go 4 keys
    a pass (8 accumulators; 8 keys' 16 spilled): the same attention at TT_TARGET=avx2 took
    3.36 s through attention_kernel, 2.80 with 8 keys a pass, 1.80-1.83 with 4 (3: 2.15, 5:
    2.12, 6: 1.99)."""
    R, KB, L = rows, ATTENTION_BLOCK, float_lanes()
    G = -(-R // L)  # vectors of rows: two share each key element and value element loaded
    assert G <= 2, (R, L)
    W = G * L       # floats per dimension of the tile's transposed rows
    VEC, BITS, BYTES = f"<{L} x float>", f"<{L} x i1>", f"<{L} x i8>"
    k = Kernel(name, signatures.ATTENTION)
    qt = k.scratch("float", k.mul("%D", W))    # the tile's q rows transposed: qt[d * W + r]
    partials = k.scratch("float", float_lanes() * KB * W)  # each key's lane partial sums: [lane][key][r]
    ot = k.scratch("float", k.mul("%DV", W))   # the rows' accumulators transposed: ot[x * W + r]
    zeros = k.scratch("float", "%DV")          # the value row of a key no row weighs (its own may be NaN)
    splat = lambda c: constant(c, L, "float")  # noqa: E731
    with k.loop("0", "%DV", hint="zeros") as x:
        k.store("0.0", k.at(zeros, x), F32)
    last_key = k.op("sub i64 %S, 1")

    with k.loop("%r0", "%r1", step=R, hint="tile") as t:
        q, out, mask = _tile_rows(k, t, R)
        with k.loop("0", "%D", hint="transpose") as d:
            for g in range(G):
                lanes = "zeroinitializer"
                for r in range(g * L, min(R, g * L + L)):
                    element = k.op(f"load float, ptr {k.at(q[r], d)}")
                    lanes = k.op(f"insertelement {VEC} {lanes}, float {element}, i32 {r - g * L}")
                k.raw(f"  store {VEC} {lanes}, ptr {k.at(qt, k.add(k.mul(d, W), g * L))}, align 4")
        with k.loop("0", k.mul("%DV", G), hint="zero") as x:
            k.raw(f"  store {VEC} zeroinitializer, ptr {k.at(ot, k.mul(x, L))}, align 4")

        with k.loop("0", "%S", step=KB, hint="block") as j0:
            peak = [k.carry(splat(NEG_INF), VEC) for _ in range(G)]
            total = [k.carry("zeroinitializer", VEC) for _ in range(G)]
            jn = k.op(f"call i64 @llvm.smin.i64(i64 {k.op(f'sub i64 %S, {j0}')}, i64 {KB})")
            live = _block_seen(k, mask, j0, jn) if mask_kind == "bool" else "true"
            with k.when(live, hint="live") as branch:
                # a key past the last (the block cut short) reads the last one's rows, then weighs 0
                keys = [k.op(f"call i64 @llvm.smin.i64(i64 {k.add(j0, jj)}, i64 {last_key})") for jj in range(KB)]
                scores = _dots_in_lane_order(k, qt, keys, L, partials, G)  # [key][g]
                for jj, key in enumerate(keys):
                    in_block = k.splat(k.op(f"icmp slt i64 {jj}, {jn}"), L, "i1")  # not past the last key
                    for g in range(G):
                        inside = in_block
                        s = k.op(f"fmul {VEC} {scores[jj][g]}, {splat(float_literal(scale))}")
                        rows_mask = mask[g * L:(g + 1) * L]
                        if mask_kind == "add":
                            s = k.op(f"fadd {VEC} {s}, {_gathered(k, rows_mask, key, 'float', L)}")
                        if mask_kind == "bool":
                            bytes_ = _gathered(k, rows_mask, key, "i8", L)
                            inside = k.op(f"and {BITS} {inside}, {k.op(f'icmp ne {BYTES} {bytes_}, zeroinitializer')}")
                        scores[jj][g] = k.op(f"select {BITS} {inside}, {VEC} {s}, {VEC} {splat(NEG_INF)}")
                new_peaks, new_totals, corrections = [], [], []
                weights = [[None] * G for _ in keys]
                for g in range(G):
                    block_peak = scores[0][g]
                    for jj in range(1, KB):
                        block_peak = k.op(f"call {VEC} @llvm.maximum.v{L}f32({VEC} {block_peak}, {VEC} {scores[jj][g]})")
                    new_peak = k.op(f"call {VEC} @llvm.maximum.v{L}f32({VEC} {peak[g].value}, {VEC} {block_peak})")
                    dead = k.op(f"fcmp oeq {VEC} {new_peak}, {splat(NEG_INF)}")  # nothing seen yet: keep zeros
                    moved = k.exp(k.op(f"fsub {VEC} {peak[g].value}, {new_peak}"), L)
                    corrections.append(k.op(f"select {BITS} {dead}, {VEC} {splat('1.0')}, {VEC} {moved}"))
                    block_total = "zeroinitializer"  # in key order, as a row's sum always is
                    for jj in range(KB):
                        w = k.op(f"select {BITS} {dead}, {VEC} zeroinitializer, {VEC} "
                                 f"{k.exp(k.op(f'fsub {VEC} {scores[jj][g]}, {new_peak}'), L)}")
                        weights[jj][g] = w
                        block_total = k.op(f"fadd {VEC} {block_total}, {w}")
                    new_peaks.append(new_peak)
                    new_totals.append(k.op(f"fadd {VEC} {k.op(f'fmul {VEC} {total[g].value}, {corrections[g]}')}, "
                                           f"{block_total}"))
                # each key's value row, or the zero row where no row weighs it
                rows_v = []
                for ws, key in zip(weights, keys):
                    weighed = "false"
                    for w in ws:
                        some = k.op(f"call i1 @llvm.vector.reduce.or.v{L}i1({BITS} "
                                    f"{k.op(f'fcmp une {VEC} {w}, zeroinitializer')})")
                        weighed = k.op(f"or i1 {weighed}, {some}")
                    rows_v.append(k.op(f"select i1 {weighed}, ptr {k.at('%V', k.mul(key, '%ldv'))}, ptr {zeros}"))
                _weighted(k, ot, corrections, weights, rows_v, L)
            for g in range(G):
                peak[g].set(branch.join(new_peaks[g], peak[g].value, VEC))
                total[g].set(branch.join(new_totals[g], total[g].value, VEC))

        with k.loop("0", "%DV", hint="write") as x:  # out = acc / sum
            for g in range(G):
                at = k.at(ot, k.add(k.mul(x, W), g * L))
                o = k.op(f"fdiv {VEC} {k.vload(at, L, 'float', 4)}, {total[g].final}")
                for r in range(g * L, min(R, g * L + L)):
                    k.store(k.op(f"extractelement {VEC} {o}, i32 {r - g * L}"), k.at(out[r], x), F32)
    return k.finish()


def _weighted(k, ot, corrections, weights, rows_v, L):
    """ot = ot * correction + the block's weights times their value rows, added key by key in
    order (the rows' accumulators transposed: ot[x * W + r], W = L x the vectors of rows), 8
    accumulators at a time: an accumulator's additions are a chain, one per key, and 8 chains
    side by side keep the multiply-adders busy (4 heads of 6,432 x 6,432 x 80, 1 thread,
    Emerald Rapids, four alternating runs: 0.78-0.87 s one at a time, 0.74-0.85 eight)."""
    G = len(corrections)
    VEC, U, W = f"<{L} x float>", 8 // G, G * L
    whole = k.op(f"and i64 %DV, {-U}")
    for lo, hi, step in (("0", whole, U), (whole, "%DV", 1)):
        with k.loop(lo, hi, step=step, hint="weighted") as x0:
            xs = [k.add(x0, u) for u in range(step)]
            ats = [k.at(ot, k.add(k.mul(x, W), g * L)) for x in xs for g in range(G)]
            acc = [k.op(f"fmul {VEC} {k.vload(at, L, 'float', 4)}, {corrections[i % G]}") for i, at in enumerate(ats)]
            for ws, row in zip(weights, rows_v):
                values = [k.splat(k.op(f"load float, ptr {k.at(row, x)}"), L) for x in xs]
                acc = [k.fma(ws[i % G], values[i // G], o, VEC) for i, o in enumerate(acc)]
            for o, at in zip(acc, ats):
                k.raw(f"  store {VEC} {o}, ptr {at}, align 4")


def _gathered(k, mask, key, storage: str, lanes: int) -> str:
    """<lanes x storage> of each row's mask element for this key (0 past the tile's rows)."""
    vector = "zeroinitializer"
    for r, row in enumerate(mask):
        element = k.op(f"load {storage}, ptr {_mask_at(k, row, key, storage)}")
        vector = k.op(f"insertelement <{lanes} x {storage}> {vector}, {storage} {element}, i32 {r}")
    return vector


def _dots_in_lane_order(k, qt, keys, L, partials, G=1) -> list[list[str]]:
    """Per key, the dot products of every row of the tile (the lanes of its G vectors) with the
    key, in the order _dot_rows sums one row's: W = float_lanes partial sums over the dimensions
    l, l + W, ..., a fixed tree over them, then the last D % W one by one. The tile's rows are
    its lanes here, so the lane partials are separate vectors, added row-wise in the same tree.
    With two vectors of rows each key element loaded feeds both, and the keys go in two halves
    (16 accumulators either way)."""
    W, KB, VEC, width = float_lanes(), len(keys), f"<{L} x float>", G * L
    whole = k.op(f"and i64 %D, {-W}")
    per_pass = KB // G if vector_registers() >= 32 else 4  # accumulators that fit the registers
    for first in range(0, KB, per_pass):
        group = keys[first:first + per_pass]
        with k.loop("0", W, hint="lane") as lane:  # lane partial `lane` of the keys, side by side
            with k.loop(lane, whole, step=W, hint="dots") as d:
                qv = [k.vload(k.at(qt, k.add(k.mul(d, width), g * L)), L, "float", 4) for g in range(G)]
                dots = []
                for key in group:
                    element = k.splat(k.op(f"load float, ptr {k.at('%K', k.add(k.mul(key, '%ldk'), d))}"), L)
                    for g in range(G):
                        dot = k.carry("zeroinitializer", VEC)
                        dot.set(k.fma(qv[g], element, dot.value, VEC))
                        dots.append(dot)
            for i, dot in enumerate(dots):
                jj, g = first + i // G, i % G
                at = k.at(partials, k.add(k.mul(k.add(k.mul(lane, KB), jj), width), g * L))
                k.raw(f"  store {VEC} {dot.final}, ptr {at}, align 4")
    totals = []
    for jj in range(KB):
        for g in range(G):
            level = [k.vload(k.at(partials, (lane * KB + jj) * width + g * L), L, "float", 4) for lane in range(W)]
            while len(level) > 1:  # tree_sum's halves: lane i + lane i + n/2, until one is left
                half = len(level) // 2
                level = [k.op(f"fadd {VEC} {level[i]}, {level[i + half]}") for i in range(half)]
            totals.append(level[0])
    with k.loop(whole, "%D", hint="dtail") as d:
        qv = [k.vload(k.at(qt, k.add(k.mul(d, width), g * L)), L, "float", 4) for g in range(G)]
        tails = []
        for jj, key in enumerate(keys):
            element = k.splat(k.op(f"load float, ptr {k.at('%K', k.add(k.mul(key, '%ldk'), d))}"), L)
            for g in range(G):
                dot = k.carry(totals[jj * G + g], VEC)
                dot.set(k.fma(qv[g], element, dot.value, VEC))
                tails.append(dot)
    return [[tails[jj * G + g].final for g in range(G)] for jj in range(KB)]
