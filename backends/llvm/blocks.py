"""Block-quantised weights (ops/blocks.py) in registers: reading one block, the one place that
knows each format's bytes, and the integer dot product of a block with a block of 8-bit
activations, with the instructions the target has for it.

A block comes out as 32 bytes of integers, a float scale d and, for every format but q8_0, a
float m added to each value: value = d * q + m, with q unsigned (0..31) and m = the format's
minimum, or -offset * d for q4_0 and q5_0. Keeping q unsigned is what the byte dot products
multiply (unsigned x signed); the offset comes back as m times the activations' sum.
"""
from dataclasses import dataclass

from backends.llvm.target import Target, host
from ops.blocks import BLOCK, Format

BYTES = f"<{BLOCK} x i8>"
LANES = 8  # the i32 (and then float) lanes a block's dot product is kept in


@dataclass
class Block:
    q: str             # <32 x i8>: unsigned integers, or signed ones (q8_0)
    signed: bool
    d: str             # float
    m: str | None      # float added to each value; None for q8_0


def read_block(k, f: Format, at: str) -> Block:
    """The block at address `at`."""
    d = _half(k, at)
    quants = k.at(at, f.quants_at, "i8")
    if not f.nibbles:
        return Block(k.vload(quants, BLOCK, "i8"), True, d, None)
    packed = k.vload(quants, BLOCK // 2, "i8")  # byte j: value j in the low nibble, j + 16 in the high
    low = k.op(f"and <16 x i8> {packed}, {_splat_i8(15, 16)}")
    high = k.op(f"lshr <16 x i8> {packed}, {_splat_i8(4, 16)}")
    q = k.concat(low, high, BLOCK // 2, "i8")
    if f.high_bits:  # bit j of a u32 is value j's fifth bit
        bits = k.op(f"load i32, ptr {k.at(at, f.scale_bytes, 'i8')}, align 1")
        fifth = k.op(f"zext <32 x i1> {k.op(f'bitcast i32 {bits} to <32 x i1>')} to {BYTES}")
        q = k.op(f"or {BYTES} {q}, {k.op(f'shl {BYTES} {fifth}, {_splat_i8(4, BLOCK)}')}")
    m = _half(k, k.at(at, 2, "i8")) if f.has_min else k.op(f"fmul float {d}, -{f.offset}.0")
    return Block(q, False, d, m)


def dot(k, w: Block, a: str, target: Target | None = None) -> str:
    """<8 x i32> partial sums of w.q . a (a: 32 signed bytes), each lane the sum of 4
    neighbouring products: exact, whichever instructions compute it (no sum can saturate:
    |q| <= 128 and |a| <= 127)."""
    u, s = w.q, a
    if w.signed:  # unsigned x signed: |w| times a with w's sign
        u = k.op(f"call {BYTES} @llvm.abs.v32i8({BYTES} {w.q}, i1 false)")
        negative = k.op(f"icmp slt {BYTES} {w.q}, zeroinitializer")
        s = k.op(f"select <32 x i1> {negative}, {BYTES} {k.op(f'sub {BYTES} zeroinitializer, {a}')}, {BYTES} {a}")
    features = set((target or host()).features.split(","))
    if "+avxvnni" in features or {"+avx512vnni", "+avx512vl"} <= features:
        return k.op(f"call <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32> zeroinitializer, {BYTES} {u}, {BYTES} {s})")
    if "+avx2" in features:
        pairs = k.op(f"call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw({BYTES} {u}, {BYTES} {s})")
        return k.op(f"call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> {pairs}, <16 x i16> {_splat(1, 16, 'i16')})")
    wide = f"<{BLOCK} x i32>"  # anything else: widen and add neighbours; LLVM picks the instructions
    products = k.op(f"mul {wide} {k.op(f'zext {BYTES} {u} to {wide}')}, {k.op(f'sext {BYTES} {s} to {wide}')}")
    n = BLOCK
    while n > LANES:
        even, odd = (k.op(f"shufflevector <{n} x i32> {products}, <{n} x i32> poison, <{n // 2} x i32> "
                          f"<{', '.join(f'i32 {i}' for i in range(first, n, 2))}>") for first in (0, 1))
        n //= 2
        products = k.op(f"add <{n} x i32> {even}, {odd}")
    return products


def _half(k, at: str) -> str:
    return k.op(f"fpext half {k.op(f'load half, ptr {at}, align 1')} to float")


def _splat_i8(value: int, n: int) -> str:
    return _splat(value, n, "i8")


def _splat(value: int, n: int, element: str) -> str:
    return "<" + ", ".join([f"{element} {value}"] * n) + ">"
