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
add_offset, add_step) on the same scales (the reads' lanes_group and lanes_block)."""
from backends.llvm.blocks import reads as format_reads
from backends.llvm.blocks.dot import LANES, SUMS, dot, prepare
from backends.llvm.blocks.lanes import Lanes
from backends.llvm.column_lanes import add_offset, add_piece, add_step
from ops import dtypes
from ops.blocks import BLOCK

F32 = dtypes.float32
def few_row_sums(k, w_types, rows, cols, ahead, target=None, depth="%K", scales=()):
    """{(weight, row, c): sum_k x[row, k] * W[c, k]}, as column_lanes.column_lane_sums gives
    them, for the weight rows (one per lane) at byte offsets cols[weight] and a few rows of x
    (each row's weights are read once for all of them). `scales` is column_lanes.scratch's;
    ahead[weight], in bytes, where each column's bytes are asked for before they are read: the
    same bytes of the next step's columns. (The weights stream through once per decode step,
    and the hardware prefetcher alone left a one-row kernel at ~60% of the read bandwidth.
    A fixed 4 KiB ahead of each row, as that kernel had, lands within this step's own columns
    when rows are shorter: 1B Q4_0's decode ran 21.8 tok/s so, 26.2 so, Emerald Rapids.)"""
    formats = [t.block for t in w_types]
    read = [format_reads(f) for f in formats]
    v = Lanes(k, len(cols[0]), target)
    integer = [r.integer and v.integer for r in read]
    subs = max(f.sub_blocks for f in formats)  # x's blocks per step
    blocks = k.op(f"lshr i64 {depth}, {BLOCK.bit_length() - 1}")
    pairs = [(i, r) for i in range(len(formats)) for r in range(len(rows))]
    with k.loop("0", k.op(f"udiv i64 {depth}, {subs * BLOCK}"), hint="step") as step:
        acc = {x: k.carry("zeroinitializer", v.floats) for x in pairs}
        sums = {x: acc[x].value for x in pairs}
        totals = {x: "zeroinitializer" for x in pairs if integer[x[0]]}  # integer scales: the step's
        where, groups = [], {}
        for i, f in enumerate(formats):
            size = subs // f.sub_blocks * f.block_bytes  # the step's bytes of each weight row
            where.append([k.at(f"%W{i}", k.add(col, k.mul(step, size)), "i8") for col in cols[i]])
            for w in where[i]:
                for line in range(0, size, 64):
                    k.prefetch(k.at(w, k.add(ahead[i], line), "i8"))
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
                weights = [prepare(k, r_i.block(k, g, sub), target, f.small, f.unsigned) for g in groups[i]]
                # the columns' scales as the lane kernel has them (LLVM drops its transposed
                # values, which nothing here uses)
                block = r_i.lanes_block(v, where[i], scales[i], str(s), str(s // 2), s % 2)
                for r in range(len(rows)):
                    pieces = column_totals(k, [dot(k, w, a[r], target, f.small, f.unsigned) for w in weights],
                                           len(block.pieces), v)
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


def column_totals(k, partials: list[str], pieces: int, v: Lanes) -> list[str]:
    """The columns' integer totals from their <8 x i32> partial sums (partials[c], column c's):
    `pieces` vectors (1, or q6_k's 2 of 16 values each), piece p's lane c the sum of column c's
    lanes 8p / pieces onwards. Neighbouring lanes are added pairwise, two vectors into one, until
    each column holds `pieces` lanes: two shuffles and an add per pair (vphaddd's work)."""
    level, width = partials, LANES  # each vector holds LANES / width columns, `width` lanes each
    while width > pieces:
        level = [_pair_sums(k, a, b) for a, b in zip(level[::2], level[1::2])]
        width //= 2
    n = LANES
    while len(level) > 1:  # side by side: column c's `pieces` lanes at c * pieces
        level = [k.concat(a, b, n, "i32") for a, b in zip(level[::2], level[1::2])]
        n *= 2
    if pieces == 1:
        return level
    return [k.op(f"shufflevector <{n} x i32> {level[0]}, <{n} x i32> poison, {v.sums} "
                 f"<{', '.join(f'i32 {c * pieces + p}' for c in range(v.n))}>") for p in range(pieces)]


def _pair_sums(k, a: str, b: str) -> str:
    """a and b side by side, each pair of neighbouring lanes added: <8 x i32>."""
    even, odd = (k.op(f"shufflevector {SUMS} {a}, {SUMS} {b}, {SUMS} "
                      f"<{', '.join(f'i32 {i}' for i in range(first, 2 * LANES, 2))}>") for first in (0, 1))
    return k.op(f"add {SUMS} {even}, {odd}")
