"""The K-quants' super-blocks (ops/kquants.py has their byte layout) in registers: what the
eight sub-blocks share, read once per super-block (`read_super_block`: the scales and minimums
as float vectors), then each sub-block of 32 values (`read_sub_block`) into blocks.Block, as
blocks.read_block reads the simple formats. The same integers, scales and minimums as
ops.kquants.sub_blocks, each scale and minimum one float32 multiply as there. `sub` is known
when the kernel is built, so which bytes and bits a sub-block takes is fixed code."""
from dataclasses import dataclass

from backends.llvm.blocks import BYTES, F16, LANES, Block
from backends.llvm.emitter import constant
from ops.blocks import BLOCK, Format


@dataclass
class SuperBlock:
    at: str                  # its address
    scales: str              # <8 x float>, each sub-block's (q6_k: <16 x float>, each 16 values')
    minimums: str | None     # <8 x float>, each sub-block's minimum (q4_k, q5_k), else None


def read_super_block(k, f: Format, at: str) -> SuperBlock:
    if f.name == "q6_k":
        sc = k.op(f"sitofp <16 x i8> {k.vload(k.at(at, 192, 'i8'), 16, 'i8')} to <16 x float>")
        return SuperBlock(at, k.op(f"fmul <16 x float> {k.splat(k.load(k.at(at, 208, 'i8'), F16), 16)}, {sc}"), None)
    packed = k.vload(k.at(at, 4, "i8"), 16, "i8")  # the 12 bytes of ops.kquants.scale_min (and 4 beyond)

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
        return k.op(f"fmul <{LANES} x float> {k.splat(k.load(k.at(at, offset, 'i8'), F16), LANES)}, {floats}")

    return SuperBlock(at, scaled(sc, 0), k.op(f"fneg <{LANES} x float> {scaled(mn, 2)}"))


def read_sub_block(k, f: Format, sup: SuperBlock, sub: int) -> Block:
    """Sub-block `sub` (0-7) of a super-block: its integers, and its scale in every lane (q6_k:
    the first 16 values' in lanes 0-3, the others' in 4-7). Its minimum stays in `sup`, to be
    added once per super-block."""
    at = sup.at
    if f.name == "q6_k":
        h, t = divmod(sub, 4)
        ql = k.vload(k.at(at, 64 * h + 32 * (t % 2), "i8"), BLOCK, "i8")
        low = bitfield(k, ql, 4 * (t // 2), 15)
        qh = k.vload(k.at(at, 128 + 32 * h, "i8"), BLOCK, "i8")
        high = k.op(f"shl {BYTES} {bitfield(k, qh, 2 * t, 3)}, {constant(4, BLOCK)}")
        w = k.op(f"sub {BYTES} {k.op(f'or {BYTES} {low}, {high}')}, {constant(32, BLOCK)}")
        return Block(w, _lanes(k, sup.scales, 16, [8 * h + 2 * t] * 4 + [8 * h + 2 * t + 1] * 4), None)
    qs = k.vload(k.at(at, f.block_bytes - 128 + 32 * (sub // 2), "i8"), BLOCK, "i8")
    w = bitfield(k, qs, 4 * (sub % 2), 15)
    if f.high_bits:  # q5_k: bit `sub` of qh[l] is value l's fifth bit
        fifth = bitfield(k, k.vload(k.at(at, 16, "i8"), BLOCK, "i8"), sub, 1)
        w = k.op(f"or {BYTES} {w}, {k.op(f'shl {BYTES} {fifth}, {constant(4, BLOCK)}')}")
    return Block(w, _lanes(k, sup.scales, LANES, [sub] * LANES), None)


def _lanes(k, v: str, n: int, picks: list[int]) -> str:
    """<8 x float> of the given lanes of an <n x float>."""
    return k.op(f"shufflevector <{n} x float> {v}, <{n} x float> poison, <{LANES} x i32> "
                f"<{', '.join(f'i32 {x}' for x in picks)}>")


def bitfield(k, v: str, shift, mask: int, n: int = BLOCK) -> str:
    """(v >> shift) & mask, bytewise, for an <n x i8>; shift a constant or an i64 known only
    when the kernel runs."""
    if isinstance(shift, str):
        v = k.op(f"lshr <{n} x i8> {v}, {k.splat(k.op(f'trunc i64 {shift} to i8'), n, 'i8')}")
    elif shift:
        v = k.op(f"lshr <{n} x i8> {v}, {constant(shift, n)}")
    return k.op(f"and <{n} x i8> {v}, {constant(mask, n)}")
