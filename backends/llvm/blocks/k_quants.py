"""q4_k and q5_k (ops/blocks/k_quants.py) in registers: what the eight sub-blocks of a
super-block share, read once (`group`, `lanes_group`: the scales and minimums as float
vectors), then each sub-block of 32 values. The same integers, scales and minimums as
KQuant.read, each scale and minimum one float32 multiply as there."""
from backends.llvm.blocks.dot import BYTES, LANES, Block, bitfield
from backends.llvm.blocks.lanes import LaneBlock, Lanes, Piece
from backends.llvm.blocks.reads import Group, Reads, field, lanes_of
from backends.llvm.emitter import constant
from ops.blocks import BLOCK


class KQuantReads(Reads):
    scratch = 17  # the scales of the 8 sub-blocks, their minimums, then (integer scales) d
    integer = True

    def group(self, k, at: str) -> Group:
        f = self.f
        packed = k.vload(k.at(at, f.SCALES, "i8"), 16, "i8")  # the 12 bytes of KQuant's scale_min (and 4 beyond)

        def pick(lanes, shift, mask):  # lane j: (packed[lanes[j]] >> shift[j]) & mask[j]; None: 0
            v = k.op(f"shufflevector <16 x i8> {packed}, <16 x i8> zeroinitializer, <{LANES} x i32> "
                     f"<{', '.join(f'i32 {16 if x is None else x}' for x in lanes)}>")
            v = k.op(f"lshr <{LANES} x i8> {v}, <{', '.join(f'i8 {x}' for x in shift)}>")
            return k.op(f"and <{LANES} x i8> {v}, <{', '.join(f'i8 {x}' for x in mask)}>")

        def with_top(low, tops):  # sub-blocks 4-7 take their top two bits from the top of `tops`
            top = k.op(f"shl <{LANES} x i8> {pick([None] * 4 + tops, [6] * 8, [3] * 8)}, {constant(4, LANES)}")
            return k.op(f"or <{LANES} x i8> {low}, {top}")

        six_or_four = [63] * 4 + [15] * 4
        sc = with_top(pick([0, 1, 2, 3, 8, 9, 10, 11], [0] * 8, six_or_four), [0, 1, 2, 3])
        mn = with_top(pick([4, 5, 6, 7, 8, 9, 10, 11], [0] * 4 + [4] * 4, six_or_four), [4, 5, 6, 7])

        def scaled(v, offset):  # the float16 at `offset` times each lane
            floats = k.op(f"uitofp <{LANES} x i8> {v} to <{LANES} x float>")
            return k.op(f"fmul <{LANES} x float> {k.splat(k.block_scale(field(k, at, offset)), LANES)}, {floats}")

        return Group(at, scaled(sc, f.D), k.op(f"fneg <{LANES} x float> {scaled(mn, f.DMIN)}"))

    def block(self, k, group: Group, sub: int) -> Block:
        """Sub-block `sub` (0-7): its integers, and its scale in every lane. Its minimum stays
        in the group, to be added once per super-block."""
        f, at = self.f, group.at
        qs = k.vload(k.at(at, f.qs_at + 32 * (sub // 2), "i8"), BLOCK, "i8")
        w = bitfield(k, qs, 4 * (sub % 2), 15)
        if f.high_bits:  # q5_k: bit `sub` of qh[l] is value l's fifth bit
            fifth = bitfield(k, k.vload(k.at(at, f.QH, "i8"), BLOCK, "i8"), sub, 1)
            w = k.op(f"or {BYTES} {w}, {k.op(f'shl {BYTES} {fifth}, {constant(4, BLOCK)}')}")
        return Block(w, lanes_of(k, group.scales, LANES, [sub] * LANES), None)

    def lanes_group(self, v: Lanes, where, scratch):
        """The columns' scales into scratch[0:8] and their negated minimums into [8:16], each
        the same float32 operations as `group`; with integer scales (Lanes.integer) the 6-bit
        scales themselves, and d at [16]."""
        f, k = self.f, v.k
        # d, dmin, then scale_min's 12 bytes: the block's first 16 bytes, as four i32 lanes
        words = [k.op(f"bitcast {v.bytes} {x} to {v.sums}") for x in v.transposed(where, f.D)]
        d, dmin = (v.halves(x) for x in (words[0], k.op(f"lshr {v.sums} {words[0]}, {v.ints(8 * f.DMIN)}")))

        def byte(b, shift=0, mask=255):  # (scale_min byte b >> shift) & mask, per lane
            x = k.op(f"lshr {v.sums} {words[1 + b // 4]}, {v.ints(8 * (b % 4) + shift)}")
            return k.op(f"and {v.sums} {x}, {v.ints(mask)}")

        def top(b):  # the top two bits of byte b, as bits 4-5
            return k.op(f"shl {v.sums} {byte(b, 6, 3)}, {v.ints(4)}")

        for s in range(8):
            if s < 4:
                sc, mn = byte(s, 0, 63), byte(s + 4, 0, 63)
            else:
                sc = k.op(f"or {v.sums} {byte(s + 4, 0, 15)}, {top(s - 4)}")
                mn = k.op(f"or {v.sums} {byte(s + 4, 4, 15)}, {top(s)}")
            if v.integer:  # the scale in both i16 halves (dot.scaled_dot_add)
                v.store_ints(scratch, s, k.op(f"mul {v.sums} {sc}, {v.ints(0x10001)}"))
            for at, scale, x in ((s, d, sc), (8 + s, dmin, mn))[v.integer:]:
                value = k.op(f"fmul {v.floats} {scale}, {k.op(f'uitofp {v.sums} {x} to {v.floats}')}")
                v.store(scratch, at, value if at < 8 else k.op(f"fneg {v.floats} {value}"))
        if v.integer:
            v.store(scratch, 16, d)

    def lanes_block(self, v: Lanes, where, scratch, s, j, e) -> LaneBlock:
        """Sub-block 2j + e: nibbles e of qs' 32 bytes j, unsigned, the minimum apart."""
        f, k = self.f, v.k
        parts = [v.bits(p, 4 * e, 15) for p in v.transposed32(where, k.add(k.mul(j, 32), f.qs_at))]
        if f.high_bits:  # q5_k: bit s of qh[l] is value l's fifth bit
            parts = [k.op(f"or {v.bytes} {p}, {k.op(f'shl {v.bytes} {v.bits(h, s, 1)}, {v.constant(4)}')}")
                     for p, h in zip(parts, v.transposed32(where, f.QH))]
        largest = (1 << f.bits) - 1
        if v.integer:  # the minimum comes once per step (lanes_step)
            scale = v.load_ints(scratch, s)
            return LaneBlock([Piece(0, parts, scale, v.bias(parts, 0, largest, scale), largest=largest)], None)
        return LaneBlock([Piece(0, parts, v.load(scratch, s), v.bias(parts, 0, largest))], v.load(scratch, k.add(s, 8)))

    def lanes_step(self, v: Lanes, scratch):
        return v.load(scratch, 16), [v.load(scratch, 8 + s) for s in range(8)]
