"""Reading one block of a block-quantised row (ops/blocks.py) into registers: the one place that
knows each format's bytes. A block of 32 values comes out as its integers (offset removed) as
<32 x float> and its float scale d (and minimum m for the formats that have one):
value = d * q (+ m)."""
from dataclasses import dataclass

from ops.blocks import BLOCK, Format

VALUES = f"<{BLOCK} x float>"


@dataclass
class Block:
    q: str             # <32 x float>: the integers, offset removed
    d: str             # float
    m: str | None      # float, for formats with a minimum


def read_block(k, f: Format, at: str) -> Block:
    """The block at address `at`."""
    d = _half(k, at)
    m = _half(k, k.at(at, 2, "i8")) if f.has_min else None
    quants = k.at(at, f.quants_at, "i8")
    if not f.nibbles:
        q = k.vload(quants, BLOCK, "i8")
    else:  # byte j: value j in the low nibble, value j + 16 in the high one
        packed = k.vload(quants, BLOCK // 2, "i8")
        low = k.op(f"and <16 x i8> {packed}, {_splat_i8(15, 16)}")
        high = k.op(f"lshr <16 x i8> {packed}, {_splat_i8(4, 16)}")
        q = k.concat(low, high, BLOCK // 2, "i8")
        if f.high_bits:  # bit j of a u32 is value j's fifth bit
            bits = k.op(f"load i32, ptr {k.at(at, f.scale_bytes, 'i8')}, align 1")
            fifth = k.op(f"zext <32 x i1> {k.op(f'bitcast i32 {bits} to <32 x i1>')} to <32 x i8>")
            q = k.op(f"or <32 x i8> {q}, {k.op(f'shl <32 x i8> {fifth}, {_splat_i8(4, BLOCK)}')}")
    if f.offset:
        q = k.op(f"sub <32 x i8> {q}, {_splat_i8(f.offset, BLOCK)}")
    return Block(k.op(f"sitofp <32 x i8> {q} to {VALUES}"), d, m)


def _half(k, at: str) -> str:
    return k.op(f"fpext half {k.op(f'load half, ptr {at}, align 1')} to float")


def _splat_i8(value: int, n: int) -> str:
    return "<" + ", ".join([f"i8 {value}"] * n) + ">"
