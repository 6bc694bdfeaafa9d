"""Weight blocks with one weight row per vector lane, for the prefill kernel column_lanes.py:
each format's lanes_block (simple.py, k_quants.py, q6_k.py here) gives the columns' (sub-)block
of 32 values as 8 byte vectors, vector g holding in lane c column c's values 4g..4g+3, met by
one 4-byte group of an x row broadcast to all lanes.

The stored activation bytes are q + 128 (see dot.py), so each lane's integer sum starts at
-128 times the sum of its values (`bias`, once per block for all rows). The 4- and 5-bit values
go in unsigned (0..15 or 0..31), their offset (q4_0) or minimum (q4_1, q4_k, q5_k) apart: for
values d * u + m and x's q8 block (d_x, q, s_x = d_x * sum q),
    sum_k x_k w_k = d * d_x * sum_k q_k u_k + m * s_x;
q6_k's and q8_0's go in signed, and q6_k's two scales per 32 values make two pieces of 16.
"""
from dataclasses import dataclass

from backends.llvm.blocks.dot import bitfield, dot_add, dot_add_signed, integer_scales, scaled_dot_add, scaled_products
from backends.llvm.emitter import constant
from ops.blocks import BLOCK


@dataclass
class Piece:
    """Values 4 * first onwards of the columns' block, under one scale per column."""
    first: int         # the first 4-value group
    parts: list[str]   # bytes: parts[j] holds in lane c column c's values 4 (first + j) .. + 3
    scale: str         # floats, each column's; with integer scales (Lanes.integer), i32s: the
                       # column's integer scale in both i16 halves
    bias: str          # i32s: -128 times each lane's sum of values (times the integer scale),
                       # where its integer sum starts
    absolute: list[str] | None = None  # |parts| where the products go signed (dot_add_signed; bias 0)
    largest: int = 0   # with integer scales, the largest |value|


@dataclass
class LaneBlock:
    """The columns' (sub-)block of 32 values."""
    pieces: list[Piece]
    offset: str | None  # floats: each column's term per unit of x's block sum s_x, or None


class Lanes:
    """Vectors with one lane per column (n of them): their types, and the operations on them."""

    def __init__(self, k, n: int, target):
        self.k, self.n, self.target = k, n, target
        self.floats, self.sums, self.bytes = f"<{n} x float>", f"<{n} x i32>", f"<{4 * n} x i8>"

    def dot_add(self, acc: str, a: str, w: str) -> str:
        return dot_add(self.k, acc, a, w, self.target, self.n)

    def dot_add_signed(self, acc: str, a: str, w: str, w_abs: str) -> str:
        return dot_add_signed(self.k, acc, a, w, w_abs)

    @property
    def integer(self) -> bool:
        """Whether a K-quant's sub-block sums take their scales as integers, once per step in
        floats (dot.integer_scales)."""
        return integer_scales(self.target)

    def scaled_dot_add(self, acc: str, pairs: list[tuple[str, str]], scale: str, largest: int) -> str:
        return scaled_dot_add(self.k, acc, pairs, scale, largest)

    def constant(self, value: int) -> str:
        return constant(value, 4 * self.n)

    def ints(self, value: int) -> str:
        return constant(value, self.n, "i32")

    def bits(self, v: str, shift, mask: int) -> str:
        return bitfield(self.k, v, shift, mask, 4 * self.n)

    def splat(self, x: str, element: str = "float") -> str:
        return self.k.splat(x, self.n, element)

    def of(self, values: list[str], element: str = "float") -> str:
        """A vector of one value per column."""
        v = "poison"
        for c, x in enumerate(values):
            v = self.k.op(f"insertelement <{self.n} x {element}> {v}, {element} {x}, i32 {c}")
        return v

    def halves(self, words: str) -> str:
        """The float16 in the low half of each i32 lane, as floats."""
        k, halves = self.k, f"<{self.n} x i16>"
        low = k.op(f"bitcast {halves} {k.op(f'trunc {self.sums} {words} to {halves}')} to <{self.n} x half>")
        return k.op(f"fpext <{self.n} x half> {low} to {self.floats}")

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

    def bias(self, parts: list[str], low: int, high: int, scale: str | None = None) -> str:
        """-128 times each lane's sum of the values in parts (each from low to high), times its
        integer scale if given: the parts are added bytewise as many at a time as cannot
        overflow a signed byte, then summed by dot_add (scaled_dot_add)."""
        k, n = self.k, 1
        while n < len(parts) and (n + 1) * high <= 127 and (n + 1) * low >= -128:
            n += 1
        acc = "zeroinitializer"
        for first in range(0, len(parts), n):
            total = parts[first]
            for part in parts[first + 1:first + n]:
                total = k.op(f"add {self.bytes} {total}, {part}")
            if scale is None:  # 128 (unsigned) times the sums
                acc = self.dot_add(acc, self.constant(-128), total)
            else:  # pairs of 128 * (sums within +-128) fit 16 bits
                acc = k.op(f"add {self.sums} {acc}, {scaled_products(k, self.constant(-128), total, scale)}")
        return k.op(f"sub {self.sums} zeroinitializer, {acc}")

    def store_ints(self, scratch: str, index, value: str):
        """Integer lanes into float vector `index` of a scratch array (the same bytes)."""
        self.store(scratch, index, self.k.op(f"bitcast {self.sums} {value} to {self.floats}"))

    def load_ints(self, scratch: str, index) -> str:
        return self.k.op(f"bitcast {self.floats} {self.load(scratch, index)} to {self.sums}")

    def store(self, scratch: str, index, value: str):
        """Float vector `index` of a step's scratch array (column_lanes.scratch)."""
        self.k.raw(f"  store {self.floats} {value}, ptr {self.k.at(scratch, index, self.floats)}, align 4")

    def load(self, scratch: str, index) -> str:
        return self.k.op(f"load {self.floats}, ptr {self.k.at(scratch, index, self.floats)}, align 4")


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
