"""q6_k (ops/blocks/q6_k.py) in registers: the super-block's 16 scales read once (`group`,
`lanes_group`), then each sub-block of 32 values, whose 6-bit integers come from a nibble of ql
and two bits of qh, minus 32. The same integers and scales as Q6K.read."""
from backends.llvm.blocks.dot import BYTES, F16, Block, bitfield
from backends.llvm.blocks.lanes import LaneBlock, Lanes, Piece
from backends.llvm.blocks.reads import Group, Reads, lanes_of
from backends.llvm.emitter import constant
from ops.blocks import BLOCK


class Q6KReads(Reads):
    scratch = 17  # a scale per 16 values, then (integer scales) d
    integer = True

    def group(self, k, at: str) -> Group:
        f = self.f
        sc = k.op(f"sitofp <16 x i8> {k.vload(k.at(at, f.SCALES, 'i8'), 16, 'i8')} to <16 x float>")
        return Group(at, k.op(f"fmul <16 x float> {k.splat(k.block_scale(k.at(at, f.D, 'i8')), 16)}, {sc}"))

    def block(self, k, group: Group, sub: int) -> Block:
        """Sub-block `sub` = 4h + t: its integers, the first 16 values' scale in lanes 0-3 and
        the others' in 4-7."""
        f, at = self.f, group.at
        h, t = divmod(sub, 4)
        ql = k.vload(k.at(at, f.QL + 64 * h + 32 * (t % 2), "i8"), BLOCK, "i8")
        low = bitfield(k, ql, 4 * (t // 2), 15)
        qh = k.vload(k.at(at, f.QH + 32 * h, "i8"), BLOCK, "i8")
        high = k.op(f"shl {BYTES} {bitfield(k, qh, 2 * t, 3)}, {constant(4, BLOCK)}")
        w = k.op(f"sub {BYTES} {k.op(f'or {BYTES} {low}, {high}')}, {constant(f.offset, BLOCK)}")
        return Block(w, lanes_of(k, group.scales, 16, [8 * h + 2 * t] * 4 + [8 * h + 2 * t + 1] * 4), None)

    def lanes_group(self, v: Lanes, where, scratch):
        """The columns' 16 scales (d times 16 signed bytes) into scratch; with integer scales
        (Lanes.integer) the signed bytes themselves, and d at [16]."""
        f, k = self.f, v.k
        d = v.of([k.load(k.at(w, f.D, "i8"), F16) for w in where])
        words = [k.op(f"bitcast {v.bytes} {x} to {v.sums}") for x in v.transposed(where, f.SCALES)]
        for i in range(16):
            byte = k.op(f"ashr {v.sums} {k.op(f'shl {v.sums} {words[i // 4]}, {v.ints(24 - 8 * (i % 4))}')}, {v.ints(24)}")
            if v.integer:  # the scale in both i16 halves (dot.scaled_dot_add)
                low = k.op(f"and {v.sums} {byte}, {v.ints(0xFFFF)}")
                v.store_ints(scratch, i, k.op(f"or {v.sums} {low}, {k.op(f'shl {v.sums} {byte}, {v.ints(16)}')}"))
            else:
                v.store(scratch, i, k.op(f"fmul {v.floats} {d}, {k.op(f'sitofp {v.sums} {byte} to {v.floats}')}"))
        if v.integer:
            v.store(scratch, 16, d)

    def lanes_block(self, v: Lanes, where, scratch, s, j, e) -> LaneBlock:
        """Sub-block 2j + e = 4h + t: 4 low bits from ql, 2 high from qh, minus 32; two pieces of
        16 values, each under its own scale."""
        f, k = self.f, v.k
        h, odd = k.op(f"lshr i64 {j}, 1"), k.op(f"and i64 {j}, 1")  # t = 2 odd + e
        low = [v.bits(p, k.mul(odd, 4), 15) for p in v.transposed32(where, k.add(k.mul(h, 64), f.QL + 32 * e))]
        high = [k.op(f"shl {v.bytes} {v.bits(p, k.add(k.mul(odd, 4), 2 * e), 3)}, {v.constant(4)}")
                for p in v.transposed32(where, k.add(k.mul(h, 32), f.QH))]
        parts = [k.op(f"sub {v.bytes} {k.op(f'or {v.bytes} {lo}, {hi}')}, {v.constant(f.offset)}")
                 for lo, hi in zip(low, high)]
        pieces = []
        for p in range(2):
            part, at = parts[4 * p:4 * p + 4], k.add(k.mul(s, 2), p)
            if v.integer:
                scale = v.load_ints(scratch, at)
                pieces.append(Piece(4 * p, part, scale, v.bias(part, -f.offset, f.offset - 1, scale), largest=f.offset))
            else:
                pieces.append(Piece(4 * p, part, v.load(scratch, at), v.bias(part, -f.offset, f.offset - 1)))
        return LaneBlock(pieces, None)

    def lanes_step(self, v: Lanes, scratch):
        return v.load(scratch, 16), None
