"""Block products for a few rows of x (a decode step, a batch of them, a prefill's last rows) in
the float order of the column-lane kernel (column_lanes.py), so that a row's sums are the same
bits whichever kernel computed them and whichever rows came with it.

column_lanes transposes 16 (AVX-512 VNNI; else 8) weight rows' blocks so that each vector lane
holds one column, which pays when 12 or 16 rows of x share the transposing: with one row it
made 1B Q4_K_M's decode 1.8x slower. Here each weight row's (sub-)block is read as it lies (its
reads' group and block, as llama.cpp's decode reads it), met by x's block in one integer dot
product of 8 lanes of partial sums, and the columns' partial sums are then added pairwise in a
tree (a transposed sum) until each lane holds one column's total: exact integers, the same the
lane kernel computes. From there both kernels run the same float code (column_lanes.add_piece,
add_offset, add_step) on the same scales (the reads' lanes_group and lanes_block).

Decode costs little or nothing so against the one-row kernel (quantised.block_sums) where the
weights stay in cache; streamed from memory, reading 8 rows interleaved loses up to ~20% on
some K-quant files (docs/performance.md). TT_BATCH_INVARIANT=0 takes the one-row kernel
instead (products.batch_invariant)."""
from backends.llvm.blocks.dot import LANES, SUMS, Block, dot, dot_add, prepare, wide_lanes
from backends.llvm.blocks.lanes import Lanes
from backends.llvm.column_lanes import add_offset, add_piece, add_step, step_plan
from backends.llvm.emitter import constant
from ops import dtypes
from ops.blocks import BLOCK

F32 = dtypes.float32
# Columns per step, one per lane of the float work (which gives each lane the same bits in
# vectors of any width). 8 with AVX-512 VNNI too, where the column-lane kernel takes 16: with
# 16, a K-quant's step held more than the registers (170 stack accesses in 960 instructions),
# and a pair of 1B-shape Q4_K matrices (SwiGLU's) ran 0.63 ms (16 columns) against 0.51 (8)
# and 0.58 for the one-row kernel, Emerald Rapids.
COLUMNS = 8


def few_row_sums(k, w_types, rows, cols, ahead, target=None, depth="%K", scales=()):
    """{(weight, row, c): sum_k x[row, k] * W[c, k]}, as column_lanes.column_lane_sums gives
    them, for the weight rows (one per lane) at byte offsets cols[weight] and a few rows of x
    (each row's weights are read once for all of them). `scales` is column_lanes.scratch's.
    ahead[weight], in bytes, is how far the next step of columns' rows lie: a step asks for its
    share of them, in address order, before they are read. (The weights stream through once
    per decode step. One weight row at a time, the hardware prefetcher sees one stream; here it
    sees the step's rows interleaved, and 1B Q4_0's decode ran at 29 tok/s with a prefetch of
    each row's bytes 4 KiB ahead (the one-row kernel's), 32 with each column's same bytes one
    step ahead, 37-40 so, against the one-row kernel's 37-38, Emerald Rapids.)"""
    formats, read, v, integer, subs, blocks, steps = step_plan(k, w_types, len(cols[0]), target, depth)
    pairs = [(i, r) for i in range(len(formats)) for r in range(len(rows))]
    with k.loop("0", steps, hint="step") as step:
        acc = {x: k.carry("zeroinitializer", v.floats) for x in pairs}
        sums = {x: acc[x].value for x in pairs}
        totals = {x: "zeroinitializer" for x in pairs if integer[x[0]]}  # integer scales: the step's
        where, groups = [], {}
        for i, f in enumerate(formats):
            size = subs // f.sub_blocks * f.block_bytes  # the step's bytes of each weight row
            where.append([k.at(f"%W{i}", k.add(col, k.mul(step, size)), "i8") for col in cols[i]])
            # the next step of columns' rows, in address order, this step's share of them (see `ahead`)
            share = v.n * size
            start = k.add(k.add(cols[i][0], ahead[i]), k.mul(step, share))
            for line in range(0, share, 64):
                k.prefetch(k.at(f"%W{i}", k.add(start, line), "i8"))
            read[i].lanes_group(v, where[i], scales[i])
        first = k.mul(step, subs)  # x's first block
        for s in range(subs):
            at = [k.add(k.mul(row, blocks), k.add(first, s)) for row in rows]
            a = [k.vload(k.at("%A", k.mul(x, BLOCK), "i8"), BLOCK, "i8") for x in at]
            d_x = [v.splat(k.load_at("%AD", x, F32)) for x in at]
            s_x = [v.splat(k.load_at("%AS", x, F32)) for x in at]
            for i, (f, r_i) in enumerate(zip(formats, read)):
                sub = s % f.sub_blocks
                if sub == 0:  # the format's next block: what its sub-blocks share, read once
                    groups[i] = [r_i.group(k, k.at(w, s // f.sub_blocks * f.block_bytes, "i8")) for w in where[i]]
                weights = [_stored(k, r_i.block(k, g, sub), f, target) for g in groups[i]]
                # the columns' scales as the lane kernel has them (LLVM drops its transposed
                # values, which nothing here uses)
                block = r_i.lanes_block(v, where[i], scales[i], str(s), str(s // 2), s % 2)
                for r in range(len(rows)):
                    pieces = column_totals(k, _partials(k, weights, a[r], f, target), len(block.pieces), v)
                    if f.offset:  # the offset times x's sum over each piece, for every column at once
                        x_sums = dot(k, _ONES, a[r], target, unsigned=True)
                        pieces = [k.op(f"sub {v.sums} {total}, {_offset_times(k, v, x_sums, f.offset, p, len(pieces))}")
                                  for p, total in enumerate(pieces)]
                    if integer[i]:  # times the integer scales, summed over the step in integers
                        for piece, total in zip(block.pieces, pieces):
                            scale = k.op(f"ashr {v.sums} {k.op(f'shl {v.sums} {piece.scale}, {v.ints(16)}')}, {v.ints(16)}")
                            totals[i, r] = k.op(f"add {v.sums} {totals[i, r]}, {k.op(f'mul {v.sums} {total}, {scale}')}")
                        continue
                    for piece, total in zip(block.pieces, pieces):
                        sums[i, r] = add_piece(v, sums[i, r], total, piece.scale, d_x[r])
                    if block.offset is not None:
                        sums[i, r] = add_offset(v, sums[i, r], block.offset, s_x[r])
        for (i, r), c in acc.items():
            if integer[i]:
                sums[i, r] = add_step(v, read[i], scales[i], k.add(k.mul(rows[r], blocks), first), sums[i, r],
                                      totals[i, r])
            c.set(sums[i, r])
    return {(i, r, c): k.op(f"extractelement {v.floats} {acc[i, r].final}, i32 {c}")
            for i, r in pairs for c in range(v.n)}


_ONES = Block(constant(1, BLOCK), None, None)


def _partials(k, weights: list[Block], a: str, f, target) -> list[str]:
    """The columns' integer dot products with x's block a, in vectors of 8 lanes of partial sums
    per column: one column per <8 x i32>, or with AVX-512 VNNI two per <16 x i32> (neighbours),
    each pair in one 512-bit vpdpbusd, and then half the shuffles to sum them across lanes
    (one row times a 1B-shape 8192 x 2048 matrix, in cache, Emerald Rapids: q4_0 0.370 ->
    0.295 ms, q4_1 0.369 -> 0.298, q8_0 0.362 -> 0.324)."""
    unsigned = f.unsigned or f.offset > 0
    if not wide_lanes(target):
        return [dot(k, w, a, target, f.small, unsigned) for w in weights]
    two = lambda x, y, n, t: k.concat(x, y, n, t)  # noqa: E731
    out = []
    for w, u in zip(weights[::2], weights[1::2]):
        both = two(w.w, u.w, BLOCK, "i8")
        if unsigned:  # unsigned w, signed x
            signed = k.op(f"xor <{BLOCK} x i8> {a}, {constant(-128, BLOCK)}")
            out.append(dot_add(k, "zeroinitializer", both, two(signed, signed, BLOCK, "i8"), target, 2 * LANES))
        else:  # x + 128 unsigned, w signed, less 128 * sum(w) (as prepare's, for the pair at once)
            bias = dot_add(k, "zeroinitializer", constant(-128, 2 * BLOCK), both, target, 2 * LANES)
            start = k.op(f"sub <{2 * LANES} x i32> zeroinitializer, {bias}")
            out.append(dot_add(k, start, two(a, a, BLOCK, "i8"), both, target, 2 * LANES))
    return out


def _stored(k, w: Block, f, target) -> Block:
    """A weight (sub-)block prepared for dot. A format with an offset (q4_0, q5_0, q6_k) goes in
    as stored, q = w + offset, unsigned (x the signed side), and the offset times x's sum is
    taken from the columns' totals once for all of them, where the signed w needs its bias per
    column, a second dot product and a subtraction (one row times an 8192 x 2048 q4_0 matrix,
    in cache: 0.445 -> 0.368 ms, Emerald Rapids)."""
    if not f.offset:
        return prepare(k, w, target, f.small, f.unsigned)
    q = k.op(f"add <{BLOCK} x i8> {w.w}, {constant(f.offset, BLOCK)}")  # LLVM folds the format's subtraction away
    return prepare(k, Block(q, w.d, w.m), target, f.small, unsigned=True)


def _offset_times(k, v: Lanes, x_sums: str, offset: int, piece: int, pieces: int) -> str:
    """offset times the sum of x's values in a piece, in every lane: from x_sums, the <8 x i32>
    lane sums (4 values each) of x's block."""
    n = LANES // pieces
    part = k.op(f"shufflevector {SUMS} {x_sums}, {SUMS} poison, <{n} x i32> "
                f"<{', '.join(f'i32 {piece * n + i}' for i in range(n))}>")
    total = k.op(f"call i32 @llvm.vector.reduce.add.v{n}i32(<{n} x i32> {part})")
    return v.splat(k.op(f"mul i32 {total}, {offset}"), "i32")


def column_totals(k, partials: list[str], pieces: int, v: Lanes) -> list[str]:
    """The columns' integer totals from their partial sums (_partials: vectors of 8 or 16 lanes,
    8 lanes per column, columns in order): `pieces` vectors (1, or q6_k's 2 of 16 values each),
    piece p's lane c the sum of column c's lanes 8p / pieces onwards. Neighbouring lanes are
    added pairwise, two vectors into one, until each column holds `pieces` lanes: two shuffles
    and an add per pair (vphaddd's work)."""
    n = v.n * LANES // len(partials)  # lanes per vector
    level, width = partials, LANES  # each vector holds n / width columns, `width` lanes each
    while width > pieces:
        if len(level) == 1:  # one vector left: its halves side by side
            a, b = k.halves(level[0], n, "i32")
            n //= 2
            level = [_pair_sums(k, a, b, n)]
        else:
            level = [_pair_sums(k, a, b, n) for a, b in zip(level[::2], level[1::2])]
        width //= 2
    while len(level) > 1:  # side by side: column c's `pieces` lanes at c * pieces
        level = [k.concat(a, b, n, "i32") for a, b in zip(level[::2], level[1::2])]
        n *= 2
    if pieces == 1:
        return level
    return [k.op(f"shufflevector <{n} x i32> {level[0]}, <{n} x i32> poison, {v.sums} "
                 f"<{', '.join(f'i32 {c * pieces + p}' for c in range(v.n))}>") for p in range(pieces)]


def _pair_sums(k, a: str, b: str, n: int) -> str:
    """a and b (<n x i32>) side by side, each pair of neighbouring lanes added: <n x i32>."""
    t = f"<{n} x i32>"
    even, odd = (k.op(f"shufflevector {t} {a}, {t} {b}, {t} <{', '.join(f'i32 {i}' for i in range(first, 2 * n, 2))}>")
                 for first in (0, 1))
    return k.op(f"add {t} {even}, {odd}")
