"""Prefill products on blocks with 16 weight rows (16 columns of C; 8 without AVX-512 VNNI) in
the lanes of one vector, as llama.cpp's repacked kernels hold them, but transposed in registers
from the file's own layout rather than repacked at load (no second copy of the weights).

block_sums (quantised.py) gives each (row, column) pair its own 8-lane integer dot product and
then 3 float operations per block; with 16 pairs per step the float work is most of it. Here
the columns' (sub-)blocks of 32 values are transposed once per step into 8 vectors (lane c: 4
values of column c; blocks/lanes.py), each met by one 4-byte group of an x row broadcast to all
lanes, so one row's block costs 8 integer dot products and a few float operations for all the
columns, and no horizontal sums. A K-quant's scales and minimums are decoded per super-block
from its transposed bytes, one vector per sub-block, and kept in a stack array that a loop over
pairs of sub-blocks reads. On AVX2 its sub-block scales are integers there, multiplied in by
the pmaddwd that adds the byte products' pairs anyway, so that a row's whole super-block is
summed in integers and met by float work once (blocks/dot.py scaled_dot_add; llama.cpp's AVX2
K-quant products do the same): the float work per sub-block was a third of the integer work.
Each format's part is its reads' lanes_group, lanes_block and (integer scales) lanes_step.
"""
from typing import NamedTuple

from backends.llvm.blocks import reads as format_reads
from backends.llvm.blocks.dot import LANES, wide_lanes
from backends.llvm.blocks.lanes import Lanes
from ops import dtypes
from ops.blocks import BLOCK

F32 = dtypes.float32


def reads(w_types, target=None) -> bool:
    """Whether every weight is in a format these kernels read."""
    return all(t.block is not None and format_reads(t.block).lanes for t in w_types)


def columns(target=None) -> int:
    """Weight rows per step, one per lane: 16 in a zmm register with AVX-512 VNNI (its byte dot
    product issues at one per cycle on 16 lanes, against two per cycle on 8, so the wider one
    halves the float work and the transposing per value), else 8."""
    return 2 * LANES if wide_lanes(target) else LANES


def scratch(k, w_types, n: int) -> list[str | None]:
    """Per weight, at the kernel's start: the stack array of vectors of n lanes its reads keep
    per step (a K-quant's scales of its super-blocks, rewritten each step), or None."""
    vectors = [format_reads(t.block).scratch for t in w_types]
    return [k.scratch(f"<{n} x float>", m) if m else None for m in vectors]


class StepPlan(NamedTuple):
    """What both block-product kernels (this one and few_rows.py) derive of their weights."""
    formats: list          # each weight's block format
    read: list             # its reads (blocks/)
    v: Lanes               # the vectors, one column per lane
    integer: list          # whether its sub-block scales go in as integers
    subs: int              # x's blocks per step of the k loop (the largest block's)
    blocks: str            # x's blocks per row
    steps: str             # steps of the k loop


def step_plan(k, w_types, n: int, target, depth) -> StepPlan:
    """The k loop's plan for n columns per step and K = depth."""
    formats = [t.block for t in w_types]
    read = [format_reads(f) for f in formats]
    v = Lanes(k, n, target)
    subs = max(f.sub_blocks for f in formats)
    shift = BLOCK.bit_length() - 1
    return StepPlan(formats, read, v, [r.integer and v.integer for r in read], subs, k.op(f"lshr i64 {depth}, {shift}"),
                    k.op(f"udiv i64 {depth}, {subs * BLOCK}"))


def column_lane_sums(k, w_types, rows, cols, target=None, depth="%K", scales=()):
    """{(weight, row, c): sum_k x[row, k] * W[c, k]} for the weight rows (one per lane) at byte
    offsets cols[weight] (x's q8 blocks in the kernel's A, AD, AS). The k loop steps by the
    largest block; a K-quant's step writes its scales to `scales` (from `scratch`), then a loop
    over pairs of sub-blocks reads them (unrolled, the 8 sub-blocks' values did not fit the
    registers), a smaller format's blocks in a straight run beside them. `depth` is K: the
    argument, or a constant."""
    formats, read, v, integer, subs, blocks, steps = step_plan(k, w_types, len(cols[0]), target, depth)
    with k.loop("0", steps, hint="step") as step:
        acc = {(i, r): k.carry("zeroinitializer", v.floats) for i in range(len(formats)) for r in range(len(rows))}
        where = []
        for i, f in enumerate(formats):
            base = k.mul(step, subs // f.sub_blocks * f.block_bytes)
            where.append([k.at(f"%W{i}", k.add(col, base), "i8") for col in cols[i]])
            read[i].lanes_group(v, where[i], scales[i])
        first = k.mul(step, subs)  # x's first block
        if subs == 1:
            _add_blocks(v, read, where, scales, rows, blocks, first, "0", [0], acc, {})
        else:
            with k.loop("0", str(subs // 2), hint="pair", nonempty=True) as j:
                inner = {x: k.carry(c.value, v.floats) for x, c in acc.items() if not integer[x[0]]}
                # integer scales: each row's integer sum over the step, and the bias they share
                sums = {x: k.carry("zeroinitializer", v.sums) for x in acc if integer[x[0]]}
                sums |= {(i, None): k.carry("zeroinitializer", v.sums) for i in range(len(formats)) if integer[i]}
                _add_blocks(v, read, where, scales, rows, blocks, first, j, [0, 1], inner, sums)
            for x, c in acc.items():
                if x in inner:
                    c.set(inner[x].final)
                    continue
                total = k.op(f"add {v.sums} {sums[x].final}, {sums[x[0], None].final}")
                c.set(add_step(v, read[x[0]], scales[x[0]], k.add(k.mul(rows[x[1]], blocks), first), c.value, total))
    return {(i, r, c): k.op(f"extractelement {v.floats} {acc[i, r].final}, i32 {c}")
            for i in range(len(formats)) for r in range(len(rows)) for c in range(v.n)}


def add_piece(v: Lanes, acc: str, total: str, scale: str, d_x: str) -> str:
    """acc + a piece's integer sums (each column's, exact) times its columns' scale and x's d.
    This and add_offset are the float order of every block product (few_rows.py's too), a
    chain per column with no reassociation: a row's sums are then the same bits whichever
    kernel computed them, alone or beside other rows (a decode step, a prefill, a batch)."""
    k = v.k
    floats = k.op(f"sitofp {v.sums} {total} to {v.floats}")
    return k.fma(k.op(f"fmul {v.floats} {floats}, {scale}"), d_x, acc, v.floats)


def add_offset(v: Lanes, acc: str, offset: str, s_x: str) -> str:
    """acc + the columns' offsets (a minimum, per unit of x's block sum) times x's block sum."""
    return v.k.fma(offset, s_x, acc, v.floats)


def add_step(v: Lanes, read, scratch, at, acc: str, total: str) -> str:
    """acc + a row's integer sums over a step (integer scales: x's blocks at..at + 7), in
    floats: times the columns' d and x's d (one per step: q8_K's), plus the offsets times the
    s_x of each block."""
    k = v.k
    d, offsets = read.lanes_step(v, scratch)
    acc = add_piece(v, acc, total, d, v.splat(k.load_at("%AD", at, F32)))
    for s, offset in enumerate(offsets or []):
        acc = add_offset(v, acc, offset, v.splat(k.load_at("%AS", k.add(at, s), F32)))
    return acc


def _add_blocks(v: Lanes, read, where, scales, rows, blocks, first, j, halves, acc, sums):
    """acc[weight, row] += the columns' products with x's blocks first + len(halves) * j + e, e
    in halves (each a sub-block of a K-quant, a block of a simple format); for a weight with
    integer scales, sums[weight, row] (and sums[weight, None] the bias) in integers instead."""
    k = v.k
    for e in halves:
        s = k.add(k.mul(j, len(halves)), e)  # the block within the step
        b = k.add(first, s)
        at = [k.add(k.mul(row, blocks), b) for row in rows]
        groups = [v.groups(k.at("%A", k.mul(x, BLOCK), "i8")) for x in at]  # row * K + b * 32
        d_x = [v.splat(k.load_at("%AD", x, F32)) for x in at]
        s_x = [v.splat(k.load_at("%AS", x, F32)) for x in at]
        for i, r_i in enumerate(read):
            block = r_i.lanes_block(v, where[i], scales[i], s, j, e)
            if (i, None) in sums:
                for piece in block.pieces:
                    sums[i, None].set(k.op(f"add {v.sums} {sums[i, None].current}, {piece.bias}"))
                    for r in range(len(rows)):
                        pairs = [(groups[r][piece.first + n], part) for n, part in enumerate(piece.parts)]
                        sums[i, r].set(v.scaled_dot_add(sums[i, r].current, pairs, piece.scale, piece.largest))
                continue
            for r in range(len(rows)):
                for piece in block.pieces:
                    chains = [piece.bias, "zeroinitializer"]  # two dependency chains
                    for n, part in enumerate(piece.parts):
                        a = groups[r][piece.first + n]
                        chains[n % 2] = v.dot_add_signed(chains[n % 2], a, part, piece.absolute[n]) \
                            if piece.absolute else v.dot_add(chains[n % 2], a, part)
                    total = k.op(f"add {v.sums} {chains[0]}, {chains[1]}")
                    acc[i, r].set(add_piece(v, acc[i, r].current, total, piece.scale, d_x[r]))
                if block.offset is not None:
                    acc[i, r].set(add_offset(v, acc[i, r].current, block.offset, s_x[r]))
