"""The simple formats (ops/blocks/simple.py: q8_0, q4_0, q4_1, q5_0, q5_1) in registers: a
block of 32 values at a time, for both product kernels."""
from backends.llvm.blocks.dot import BYTES, F16, LANES, Block, full_range
from backends.llvm.blocks.lanes import LaneBlock, Lanes, Piece
from backends.llvm.blocks.reads import Group, Reads, field
from backends.llvm.emitter import constant
from ops.blocks import BLOCK


class SimpleReads(Reads):
    @property
    def lanes(self) -> bool:  # column_lanes has no reads of the u32 of fifth bits
        return not self.f.high_bits

    @property
    def block_minimum(self) -> bool:
        return self.f.has_min

    def block(self, k, group: Group, sub: int) -> Block:
        f, at = self.f, group.at
        d = k.splat(k.block_scale(field(k, at, f.D)), LANES)
        quants = k.at(at, f.quants_at, "i8")
        if f.bits == 8:
            return Block(k.vload(quants, BLOCK, "i8"), d, None)
        packed = k.vload(quants, BLOCK // 2, "i8")  # byte j: value j in the low nibble, j + 16 in the high
        low = k.op(f"and <16 x i8> {packed}, {constant(15, 16)}")
        high = k.op(f"lshr <16 x i8> {packed}, {constant(4, 16)}")
        q = k.concat(low, high, BLOCK // 2, "i8")
        if f.high_bits:  # bit j of a u32 is value j's fifth bit
            bits = k.op(f"load i32, ptr {k.at(at, f.high_at, 'i8')}, align 1")
            fifth = k.op(f"zext <32 x i1> {k.op(f'bitcast i32 {bits} to <32 x i1>')} to {BYTES}")
            q = k.op(f"or {BYTES} {q}, {k.op(f'shl {BYTES} {fifth}, {constant(4, BLOCK)}')}")
        if f.offset:
            q = k.op(f"sub {BYTES} {q}, {constant(f.offset, BLOCK)}")
        return Block(q, d, k.block_scale(k.at(at, f.M, "i8")) if f.has_min else None)

    def lanes_block(self, v: Lanes, where, scratch, s, j, e) -> LaneBlock:
        """q8_0, q4_0, q4_1 blocks (byte j of a 4-bit block: value j low, value j + 16 high)."""
        f, k = self.f, v.k
        where = [k.at(w, k.mul(s, f.block_bytes), "i8") for w in where]
        if f.has_min:  # d and m, the block's first 4 bytes, read as one i32 per column
            assert (f.D, f.M) == (0, 2)
            words = v.of([k.op(f"load i32, ptr {w}, align 1") for w in where], "i32")
            d = v.halves(words)
        else:
            d = v.of([k.load(field(k, w, f.D), F16) for w in where])
        if f.bits == 8:
            parts = v.transposed32(where, f.quants_at)
            if full_range(v.target):
                return LaneBlock([Piece(0, parts, d, v.bias(parts, -128, 127))], None)
            # AVX2: the activations go in signed, each product taking w's sign; no bias
            absolute = [k.op(f"call {v.bytes} @llvm.abs.v32i8({v.bytes} {p}, i1 false)") for p in parts]
            return LaneBlock([Piece(0, parts, d, "zeroinitializer", absolute)], None)
        packed = v.transposed(where, f.quants_at)
        parts = [v.bits(p, 0, 15) for p in packed] + [v.bits(p, 4, 15) for p in packed]
        if f.has_min:  # m times x's block sum s, as ggml's q8_1 products take it
            offset = v.halves(k.op(f"lshr {v.sums} {words}, {v.ints(16)}"))  # m: the high half (M = D + 2)
            return LaneBlock([Piece(0, parts, d, v.bias(parts, 0, 15))], offset)
        # q4_0: the values q - 8 themselves (x's s, rounded to float16, is no sum to take 8 d of)
        parts = [k.op(f"sub {v.bytes} {p}, {v.constant(f.offset)}") for p in parts]
        return LaneBlock([Piece(0, parts, d, v.bias(parts, -f.offset, 15 - f.offset))], None)
