"""Prefill products on blocks with 16 weight rows (16 columns of C; 8 without AVX-512 VNNI) in
the lanes of one vector, as llama.cpp's repacked kernels hold them, but transposed in registers
from the file's own layout rather than repacked at load (no second copy of the weights).

block_sums (quantised.py) gives each (row, column) pair its own 8-lane integer dot product and
then 3 float operations per block; with 16 pairs per step the float work is most of it. Here
the columns' (sub-)blocks of 32 values are transposed once per step into 8 vectors (lane c: 4
values of column c), each met by one 4-byte group of an x row broadcast to all lanes, so one
row's block costs 8 integer dot products and a few float operations for all the columns, and
no horizontal sums. A K-quant's scales and minimums are decoded per super-block from its
transposed bytes, one vector per sub-block (the same float32 operations as kquants.py), and
kept in a stack array that a loop over pairs of sub-blocks reads.

The stored activation bytes are q + 128 (see blocks.py), so each lane's integer sum starts at
-128 times the sum of its values (`bias`, once per block for all rows). The 4- and 5-bit values
go in unsigned (0..15 or 0..31), their offset (q4_0) or minimum (q4_1, q4_k, q5_k) apart: for
values d * u + m and x's q8 block (d_x, q, s_x = d_x * sum q),
    sum_k x_k w_k = d * d_x * sum_k q_k u_k + m * s_x;
q6_k's and q8_0's go in signed, and q6_k's two scales per 32 values make two pieces of 16.
"""
from dataclasses import dataclass

from backends.llvm.blocks import LANES, dot_add, full_range, wide_lanes
from backends.llvm.emitter import constant
from backends.llvm.kquants import bitfield
from ops import dtypes
from ops.blocks import BLOCK

F16, F32 = dtypes.float16, dtypes.float32
FORMATS = ("q4_0", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k")


def reads(w_types, target=None) -> bool:
    """Whether every weight is in a format these kernels read (q8_0's full-range bytes need a
    dot product that does not saturate)."""
    names = [t.block.name if t.block is not None else None for t in w_types]
    return all(n in FORMATS for n in names) and ("q8_0" not in names or full_range(target))


def columns(target=None) -> int:
    """Weight rows per step, one per lane: 16 in a zmm register with AVX-512 VNNI (its byte dot
    product issues at one per cycle on 16 lanes, against two per cycle on 8, so the wider one
    halves the float work and the transposing per value), else 8."""
    return 2 * LANES if wide_lanes(target) else LANES


@dataclass
class Piece:
    """Values 4 * first onwards of the columns' block, under one scale per column."""
    first: int         # the first 4-value group
    parts: list[str]   # bytes: parts[j] holds in lane c column c's values 4 (first + j) .. + 3
    scale: str         # floats, each column's
    bias: str          # i32s: -128 times each lane's sum of values, where its integer sum starts


@dataclass
class LaneBlock:
    """The columns' (sub-)block of 32 values."""
    pieces: list[Piece]
    offset: str | None  # floats: each column's term per unit of x's block sum s_x, or None


class _Lanes:
    """Vectors with one lane per column (n of them): their types, and the operations on them."""

    def __init__(self, k, n: int, target):
        self.k, self.n, self.target = k, n, target
        self.floats, self.sums, self.bytes = f"<{n} x float>", f"<{n} x i32>", f"<{4 * n} x i8>"

    def dot_add(self, acc: str, a: str, w: str) -> str:
        return dot_add(self.k, acc, a, w, self.target, self.n)

    def constant(self, value: int) -> str:
        return constant(value, 4 * self.n)

    def bits(self, v: str, shift, mask: int) -> str:
        return bitfield(self.k, v, shift, mask, 4 * self.n)

    def splat(self, x: str, element: str = "float") -> str:
        return self.k.splat(x, self.n, element)

    def of(self, values: list[str]) -> str:
        """A float vector of one float per column."""
        v = "poison"
        for c, x in enumerate(values):
            v = self.k.op(f"insertelement {self.floats} {v}, float {x}, i32 {c}")
        return v

    def groups(self, at: str) -> list[str]:
        """x's block at `at` as 8 vectors, vector g holding bytes 4g..4g+3 in every lane."""
        k, out = self.k, []
        for g in range(BLOCK // 4):
            word = k.op(f"load i32, ptr {k.at(at, 4 * g, 'i8')}, align 1")
            out.append(k.op(f"bitcast {self.sums} {self.splat(word, 'i32')} to {self.bytes}"))
        return out

    def transposed(self, where: list[str], at) -> list[str]:
        """The 16 bytes at offset `at` of the columns' blocks as 4 vectors, vector g holding in
        lane c column c's bytes 4g..4g+3."""
        k = self.k
        words = [k.op(f"bitcast <16 x i8> {k.vload(k.at(w, at, 'i8'), 16, 'i8')} to <4 x i32>") for w in where]
        every = _joined(k, words, 4, "i32")  # column c's 4 words at 4c..4c+3
        return [k.op(f"bitcast {self.sums} {_picked(k, every, 4 * self.n, 'i32', [4 * c + g for c in range(self.n)])} "
                     f"to {self.bytes}") for g in range(4)]

    def transposed32(self, where: list[str], at) -> list[str]:
        """The 32 bytes at `at`, as transposed gives 16 of them: 8 vectors."""
        return self.transposed(where, at) + self.transposed(where, self.k.add(at, 16))

    def bias(self, parts: list[str], low: int, high: int) -> str:
        """-128 times each lane's sum of the values in parts (each from low to high): the parts
        are added bytewise as many at a time as cannot overflow a signed byte, then summed by
        dot_add."""
        k, n = self.k, 1
        while n < len(parts) and (n + 1) * high <= 127 and (n + 1) * low >= -128:
            n += 1
        acc = "zeroinitializer"
        for first in range(0, len(parts), n):
            total = parts[first]
            for part in parts[first + 1:first + n]:
                total = k.op(f"add {self.bytes} {total}, {part}")
            acc = self.dot_add(acc, self.constant(-128), total)  # 128 (unsigned) times the sums
        return k.op(f"sub {self.sums} zeroinitializer, {acc}")


def scratch(k, w_types, target=None) -> list[str | None]:
    """Per weight, at the kernel's start: for a K-quant, a stack array of 16 lane vectors for
    its super-blocks' scales (q4_k, q5_k: then the minimums; q6_k: 16 scales), one per
    sub-block, rewritten each step; else None."""
    n = columns(target)
    return [k.scratch(f"<{n} x float>", 16) if t.block.sub_blocks > 1 else None for t in w_types]


def column_lane_sums(k, w_types, rows, cols, target=None, depth="%K", scales=()):
    """{(weight, row, c): sum_k x[row, k] * W[c, k]} for the weight rows (one per lane) at byte
    offsets cols[weight] (x's q8 blocks in the kernel's A, AD, AS). The k loop steps by the
    largest block; a K-quant's step writes its scales to `scales` (from `scratch`), then a loop
    over pairs of sub-blocks reads them (unrolled, the 8 sub-blocks' values did not fit the
    registers), a smaller format's blocks in a straight run beside them. `depth` is K: the
    argument, or a constant."""
    formats = [t.block for t in w_types]
    v = _Lanes(k, len(cols[0]), target)
    subs = max(f.sub_blocks for f in formats)  # x's blocks per step
    blocks = k.op(f"lshr i64 {depth}, {BLOCK.bit_length() - 1}")
    with k.loop("0", k.op(f"udiv i64 {depth}, {subs * BLOCK}"), hint="step") as step:
        acc = {(i, r): k.carry("zeroinitializer", v.floats) for i in range(len(formats)) for r in range(len(rows))}
        where = []
        for i, f in enumerate(formats):
            base = k.mul(step, subs // f.sub_blocks * f.block_bytes)
            where.append([k.at(f"%W{i}", k.add(col, base), "i8") for col in cols[i]])
            if f.sub_blocks > 1:
                _store_scales(v, f, where[i], scales[i])
        first = k.mul(step, subs)  # x's first block
        if subs == 1:
            _add_blocks(v, formats, where, scales, rows, blocks, first, "0", [0], acc)
        else:
            with k.loop("0", str(subs // 2), hint="pair", nonempty=True) as j:
                inner = {x: k.carry(c.value, v.floats) for x, c in acc.items()}
                _add_blocks(v, formats, where, scales, rows, blocks, first, j, [0, 1], inner)
            for x, c in acc.items():
                c.set(inner[x].final)
    return {(i, r, c): k.op(f"extractelement {v.floats} {acc[i, r].final}, i32 {c}")
            for i in range(len(formats)) for r in range(len(rows)) for c in range(v.n)}


def _add_blocks(v: _Lanes, formats, where, scales, rows, blocks, first, j, halves, acc):
    """acc[weight, row] += the columns' products with x's blocks first + len(halves) * j + e, e
    in halves (each a sub-block of a K-quant, a block of a simple format)."""
    k = v.k
    for e in halves:
        s = k.add(k.mul(j, len(halves)), e)  # the block within the step
        b = k.add(first, s)
        at = [k.add(k.mul(row, blocks), b) for row in rows]
        groups = [v.groups(k.at("%A", k.mul(x, BLOCK), "i8")) for x in at]  # row * K + b * 32
        d_x = [v.splat(k.load_at("%AD", x, F32)) for x in at]
        s_x = [v.splat(k.load_at("%AS", x, F32)) for x in at]
        for i, f in enumerate(formats):
            if f.sub_blocks == 1:
                block = _simple(v, f, [k.at(w, k.mul(s, f.block_bytes), "i8") for w in where[i]])
            else:
                block = _sub_block(v, f, where[i], scales[i], j, e)
            for r in range(len(rows)):
                for piece in block.pieces:
                    chains = [piece.bias, "zeroinitializer"]  # two dependency chains
                    for n, part in enumerate(piece.parts):
                        chains[n % 2] = v.dot_add(chains[n % 2], groups[r][piece.first + n], part)
                    total = k.op(f"sitofp {v.sums} {k.op(f'add {v.sums} {chains[0]}, {chains[1]}')} to {v.floats}")
                    term = k.op(f"fmul contract {v.floats} {k.op(f'fmul {v.floats} {total}, {piece.scale}')}, {d_x[r]}")
                    acc[i, r].set(k.op(f"fadd reassoc contract {v.floats} {acc[i, r].current}, {term}"))
                if block.offset is not None:
                    term = k.op(f"fmul contract {v.floats} {block.offset}, {s_x[r]}")
                    acc[i, r].set(k.op(f"fadd reassoc contract {v.floats} {acc[i, r].current}, {term}"))


def _simple(v: _Lanes, f, where: list[str]) -> LaneBlock:
    """q8_0, q4_0, q4_1 blocks (byte j of a 4-bit block: value j low, value j + 16 high)."""
    k = v.k
    d = v.of([k.load(w, F16) for w in where])
    if f.bits == 8:
        parts = v.transposed32(where, f.quants_at)
        return LaneBlock([Piece(0, parts, d, v.bias(parts, -128, 127))], None)
    packed = v.transposed(where, f.quants_at)
    parts = [v.bits(p, 0, 15) for p in packed] + [v.bits(p, 4, 15) for p in packed]
    if f.has_min:
        offset = v.of([k.load(k.at(w, 2, "i8"), F16) for w in where])
    else:  # - o * d, exact (o a power of two)
        offset = k.op(f"fmul {v.floats} {d}, {v.splat(f'{-float(f.offset)!r}')}")
    return LaneBlock([Piece(0, parts, d, v.bias(parts, 0, 15))], offset)


def _store_scales(v: _Lanes, f, where: list[str], scales: str):
    """The columns' super-block scales (and minimums) into `scales`, vector s for sub-block s
    (q6_k: for 16 values each), each the same float32 operations as kquants.read_super_block."""
    k = v.k
    if f.name == "q6_k":  # 16 signed bytes at 192, d at 208
        d = v.of([k.load(k.at(w, 208, "i8"), F16) for w in where])
        words = [k.op(f"bitcast {v.bytes} {x} to {v.sums}") for x in v.transposed(where, 192)]
        for i in range(16):
            byte = k.op(f"ashr {v.sums} {k.op(f'shl {v.sums} {words[i // 4]}, {_ints(v, 24 - 8 * (i % 4))}')}, {_ints(v, 24)}")
            _store(v, scales, i, k.op(f"fmul {v.floats} {d}, {k.op(f'sitofp {v.sums} {byte} to {v.floats}')}"))
        return
    # d, dmin, then the 12 bytes of ops.kquants.scale_min: 6-bit scales and minimums
    words = [k.op(f"bitcast {v.bytes} {x} to {v.sums}") for x in v.transposed(where, 0)]
    d, dmin = (_halves(v, x) for x in (words[0], k.op(f"lshr {v.sums} {words[0]}, {_ints(v, 16)}")))

    def byte(b, shift=0, mask=255):  # (scale_min byte b >> shift) & mask, per lane
        x = k.op(f"lshr {v.sums} {words[1 + b // 4]}, {_ints(v, 8 * (b % 4) + shift)}")
        return k.op(f"and {v.sums} {x}, {_ints(v, mask)}")

    def top(b):  # the top two bits of byte b, as bits 4-5
        return k.op(f"shl {v.sums} {byte(b, 6, 3)}, {_ints(v, 4)}")

    for s in range(8):
        if s < 4:
            sc, mn = byte(s, 0, 63), byte(s + 4, 0, 63)
        else:
            sc = k.op(f"or {v.sums} {byte(s + 4, 0, 15)}, {top(s - 4)}")
            mn = k.op(f"or {v.sums} {byte(s + 4, 4, 15)}, {top(s)}")
        for at, scale, x in ((s, d, sc), (8 + s, dmin, mn)):
            value = k.op(f"fmul {v.floats} {scale}, {k.op(f'uitofp {v.sums} {x} to {v.floats}')}")
            _store(v, scales, at, value if at < 8 else k.op(f"fneg {v.floats} {value}"))


def _sub_block(v: _Lanes, f, where: list[str], scales: str, j: str, e: int) -> LaneBlock:
    """Sub-block 2j + e of the columns' super-blocks (j known when the kernel runs)."""
    k = v.k
    s = k.add(k.mul(j, 2), e)
    if f.name == "q6_k":  # 4 low bits from ql, 2 high from qh; minus 32. sub-block 4h + t
        h, odd = k.op(f"lshr i64 {j}, 1"), k.op(f"and i64 {j}, 1")  # t = 2 odd + e
        low = [v.bits(p, k.mul(odd, 4), 15) for p in v.transposed32(where, k.add(k.mul(h, 64), 32 * e))]
        high = [k.op(f"shl {v.bytes} {v.bits(p, k.add(k.mul(odd, 4), 2 * e), 3)}, {v.constant(4)}")
                for p in v.transposed32(where, k.add(k.mul(h, 32), 128))]
        parts = [k.op(f"sub {v.bytes} {k.op(f'or {v.bytes} {lo}, {hi}')}, {v.constant(32)}")
                 for lo, hi in zip(low, high)]
        return LaneBlock([Piece(4 * p, parts[4 * p:4 * p + 4], _load(v, scales, k.add(k.mul(s, 2), p)),
                                v.bias(parts[4 * p:4 * p + 4], -32, 31)) for p in range(2)], None)
    parts = [v.bits(p, 4 * e, 15) for p in v.transposed32(where, k.add(k.mul(j, 32), f.block_bytes - 128))]
    if f.high_bits:  # q5_k: bit s of qh[l] is value l's fifth bit
        parts = [k.op(f"or {v.bytes} {p}, {k.op(f'shl {v.bytes} {v.bits(h, s, 1)}, {v.constant(4)}')}")
                 for p, h in zip(parts, v.transposed32(where, 16))]
    return LaneBlock([Piece(0, parts, _load(v, scales, s), v.bias(parts, 0, 31 if f.high_bits else 15))],
                     _load(v, scales, k.add(s, 8)))


def _halves(v: _Lanes, words: str) -> str:
    """The float16 in the low half of each i32 lane, as floats."""
    k, halves = v.k, f"<{v.n} x i16>"
    low = k.op(f"bitcast {halves} {k.op(f'trunc {v.sums} {words} to {halves}')} to <{v.n} x half>")
    return k.op(f"fpext <{v.n} x half> {low} to {v.floats}")


def _ints(v: _Lanes, value: int) -> str:
    return constant(value, v.n, "i32")


def _store(v: _Lanes, scales: str, index, value: str):
    v.k.raw(f"  store {v.floats} {value}, ptr {v.k.at(scales, index, v.floats)}, align 4")


def _load(v: _Lanes, scales: str, index) -> str:
    return v.k.op(f"load {v.floats}, ptr {v.k.at(scales, index, v.floats)}, align 4")


def _joined(k, vectors: list[str], m: int, element: str) -> str:
    """Vectors of m elements side by side as one."""
    while len(vectors) > 1:
        vectors = [k.concat(vectors[c], vectors[c + 1], m, element) for c in range(0, len(vectors), 2)]
        m *= 2
    return vectors[0]


def _picked(k, v: str, n: int, element: str, lanes: list[int]) -> str:
    """The given lanes of an <n x element> vector."""
    return k.op(f"shufflevector <{n} x {element}> {v}, <{n} x {element}> poison, <{len(lanes)} x i32> "
                f"<{', '.join(f'i32 {x}' for x in lanes)}>")
