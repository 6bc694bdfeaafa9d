"""Block-quantised weights (ops/blocks/) in registers: a (sub-)block as the format's reads
(simple.py, k_quants.py, q6_k.py here) give it, and the integer dot product of a block with a
block of 8-bit activations, with the instructions the target has.

A (sub-)block of 32 values comes out as 32 signed bytes w, the scales d of its values as 8 float
lanes (lane i scales values 4i..4i+3, the lanes the dot product sums them into: q6_k has two
scales per 32 values) and, for the formats with one, a float minimum m: value = d * w (+ m), w
being q minus the format's offset. The activations arrive as unsigned bytes a + 128
(quantised.quantize_rows_kernel stores them so), which is what the byte dot product instructions
take (unsigned x signed); w . (a + 128) - 128 * sum(w) is the exact w . a, and the
second term is computed once per weight block (`prepare`) for every row that meets it.
"""
from dataclasses import dataclass

from backends.llvm.emitter import constant
from backends.llvm.target import Target, host
from ops import dtypes
from ops.blocks import BLOCK

F16 = dtypes.float16

BYTES = f"<{BLOCK} x i8>"
LANES = 8  # the i32 (and then float) lanes a block's dot product is kept in
SUMS = f"<{LANES} x i32>"
INT = "i32"


@dataclass
class Block:
    w: str             # <32 x i8>, signed
    d: str             # <8 x float>, each lane's scale
    m: str | None      # float minimum (q4_1, q5_1; a K-quant's stay in its reads.Group), else None
    prepared: str | None = None  # what `prepare` computed for dot


def _kind(target: Target | None) -> str:
    """The byte dot product the target has: vnni (vpdpbusd), avx2 (pmaddubsw, pmaddwd), sdot
    (aarch64's dotprod) or generic IR."""
    target = target or host()
    features = set(target.features.split(","))
    if target.arch == "aarch64":
        return "sdot" if "+dotprod" in features else "generic"
    if "+avxvnni" in features or {"+avx512vnni", "+avx512vl"} <= features:
        return "vnni"
    return "avx2" if "+avx2" in features else "generic"


def full_range(target: Target | None = None) -> bool:
    """Whether dot_add is exact for every signed byte w, not only |w| <= 63 (AVX2's pmaddubsw
    saturates its pairs of 255 * w at 32767; vpdpbusd and the generic IR sum in i32)."""
    return _kind(target) != "avx2"


def prepare(k, w: Block, target: Target | None = None, small: bool = True, unsigned: bool = False) -> Block:
    """What dot needs of a weight block for every row: nothing for `unsigned` w on x86 (w is
    then the unsigned side), -128 * its lane sums (VNNI), 128 * them (AVX2, |w| <= 32: `small`,
    so pairs of (a + 128) * w fit in i16), or |w| (AVX2, 8-bit w: (a + 128) * w would saturate)."""
    kind = _kind(target)
    if unsigned and kind in ("vnni", "avx2"):
        return w
    if kind == "vnni":
        bias = k.op(f"call {SUMS} @llvm.x86.avx512.vpdpbusd.256({SUMS} zeroinitializer, {BYTES} {constant(-128, BLOCK)}, {BYTES} {w.w})")
        w.prepared = k.op(f"sub {SUMS} zeroinitializer, {bias}")
    elif kind == "avx2" and small:
        w.prepared = _maddubs(k, constant(-128, BLOCK), w.w)
    elif kind == "avx2":
        w.prepared = k.op(f"call {BYTES} @llvm.abs.v32i8({BYTES} {w.w}, i1 false)")
    return w


def dot(k, w: Block, a: str, target: Target | None = None, small: bool = True, unsigned: bool = False) -> str:
    """<8 x i32> partial sums of w . (a - 128) for a prepared block and 32 unsigned bytes a, each
    lane the sum of 4 neighbouring products: exact, whichever instructions compute it. For
    `unsigned` w (0..31) on x86 the byte product takes w unsigned and a - 128 signed, one
    instruction (VNNI) or two (AVX2) and no bias, as llama.cpp's q4_1 and K-quant products do."""
    kind = _kind(target)
    if unsigned and kind in ("vnni", "avx2"):
        signed = _signed(k, a)  # the same for every column: CSE'd
        if kind == "vnni":
            return k.op(f"call {SUMS} @llvm.x86.avx512.vpdpbusd.256({SUMS} zeroinitializer, {BYTES} {w.w}, {BYTES} {signed})")
        return _maddubs(k, w.w, signed)
    if kind == "vnni":
        return k.op(f"call {SUMS} @llvm.x86.avx512.vpdpbusd.256({SUMS} {w.prepared}, {BYTES} {a}, {BYTES} {w.w})")
    if kind == "avx2" and small:
        return k.op(f"sub {SUMS} {_maddubs(k, a, w.w)}, {w.prepared}")
    signed = _signed(k, a)
    if kind == "sdot":  # signed times signed: a - 128 is the activation itself
        return _sdot(k, "zeroinitializer", signed, w.w)
    if kind == "avx2":  # 8-bit w: |w| (prepared) times a with w's sign
        return _sign_products(k, signed, w.w, w.prepared)
    return _widened_sums(k, k.op(f"sext {BYTES} {signed} to <{BLOCK} x i32>"), w.w)


def dot_add(k, acc: str, a: str, w: str, target: Target | None = None, lanes: int = LANES) -> str:
    """acc + the <lanes x i32> lane sums (4 neighbours each) of unsigned bytes a times signed
    bytes w, for |w| <= 63 (so that AVX2's i16 pairs of 255 * w cannot saturate). 16 lanes
    (one zmm) need AVX-512 VNNI (see wide_lanes)."""
    kind = _kind(target)
    sums, data = f"<{lanes} x i32>", f"<{4 * lanes} x i8>"
    if kind == "vnni":
        return k.op(f"call {sums} @llvm.x86.avx512.vpdpbusd.{32 * lanes}({sums} {acc}, {data} {a}, {data} {w})")
    assert lanes == LANES, f"{lanes} lanes need VNNI"
    if kind == "avx2":
        return k.op(f"add {SUMS} {acc}, {_maddubs(k, a, w)}")
    if kind == "sdot":  # a . w = (a - 128) . w + 128 * (1 . w)
        acc = _sdot(k, acc, _signed(k, a), w)
        sums = _sdot(k, "zeroinitializer", constant(1, BLOCK), w)
        return k.op(f"add {SUMS} {acc}, {k.op(f'shl {SUMS} {sums}, {constant(7, LANES, INT)}')}")
    return k.op(f"add {SUMS} {acc}, {_widened_sums(k, k.op(f'zext {BYTES} {a} to <{BLOCK} x i32>'), w)}")


def dot_add_signed(k, acc: str, a: str, w: str, w_abs: str) -> str:
    """acc + the <8 x i32> lane sums of (a - 128) times w for any signed bytes w, on AVX2 (where
    dot_add needs |w| <= 63): pmaddubsw takes |w| (unsigned, from the caller, once per w) and
    a - 128 with w's sign, whose pairs fit 16 bits (2 * 128 * 127, the activations being within
    +-127), as llama.cpp's AVX2 q8_0 product does."""
    return k.op(f"add {SUMS} {acc}, {_sign_products(k, _signed(k, a), w, w_abs)}")


def integer_scales(target: Target | None = None) -> bool:
    """Whether the K-quants' prefill sums take their sub-block scales as integers (AVX2: pmaddwd
    multiplies by them for free, where it would multiply by ones; see scaled_dot_add)."""
    return _kind(target) == "avx2"


def scaled_dot_add(k, acc: str, pairs: list[tuple[str, str]], scale: str, largest: int) -> str:
    """acc + the <8 x i32> lane sums of unsigned bytes a times signed bytes w over the (a, w) in
    pairs (|w| <= largest <= 64), each i32 lane's products times its scale (an i16 in both its
    halves), on AVX2: pmaddubsw's sums of pairs are added in 16 bits as many at a time as cannot
    overflow them, then pmaddwd multiplies by the scale and adds neighbours, as llama.cpp's
    AVX2 K-quant products do. Exact: every sum stays within its integer type."""
    fold = 32767 // (2 * 255 * largest)  # pairs of 255 * w per 16 bits
    for first in range(0, len(pairs), fold):
        total = None
        for a, w in pairs[first:first + fold]:
            pair_sums = _pair_sums(k, a, w)
            total = pair_sums if total is None else k.op(f"add <16 x i16> {total}, {pair_sums}")
        acc = k.op(f"add {SUMS} {acc}, {_scaled(k, total, scale)}")
    return acc


def scaled_products(k, u: str, s: str, scale: str) -> str:
    """<8 x i32> lane sums of unsigned bytes u times signed bytes s, each lane's times its scale
    (AVX2; exact while each pair of u * s fits 16 bits)."""
    return _scaled(k, _pair_sums(k, u, s), scale)


def _scaled(k, pair_sums: str, scale: str) -> str:
    """pmaddwd: <16 x i16> times each i32 lane's scale, neighbours added into <8 x i32>."""
    scales = k.op(f"bitcast {SUMS} {scale} to <16 x i16>")
    return k.op(f"call {SUMS} @llvm.x86.avx2.pmadd.wd(<16 x i16> {pair_sums}, <16 x i16> {scales})")


def wide_lanes(target: Target | None = None) -> bool:
    """Whether dot_add can take 16 lanes: AVX-512 VNNI (not AVX-VNNI's 256-bit form alone)."""
    features = set((target or host()).features.split(","))
    return _kind(target) == "vnni" and {"+avx512vnni", "+avx512bw"} <= features


def _widened_sums(k, a_wide: str, w: str) -> str:
    """<8 x i32> sums of 4 neighbouring products of i32 lanes a_wide and signed bytes w, in
    generic IR (LLVM picks the instructions)."""
    wide = f"<{BLOCK} x i32>"
    products = k.op(f"mul {wide} {k.op(f'sext {BYTES} {w} to {wide}')}, {a_wide}")
    n = BLOCK
    while n > LANES:
        even, odd = (k.op(f"shufflevector <{n} x i32> {products}, <{n} x i32> poison, <{n // 2} x i32> "
                          f"<{', '.join(f'i32 {i}' for i in range(first, n, 2))}>") for first in (0, 1))
        n //= 2
        products = k.op(f"add <{n} x i32> {even}, {odd}")
    return products


def _signed(k, a: str) -> str:
    """The activations a - 128 (signed bytes) from their stored form a (unsigned)."""
    return k.op(f"xor {BYTES} {a}, {constant(-128, BLOCK)}")


def _sign_products(k, signed: str, w: str, w_abs: str) -> str:
    """<8 x i32> lane sums of signed activations times any signed bytes w on AVX2: |w| times
    the activations with w's sign (psign), so pmaddubsw's pairs stay within 2 * 128 * 127."""
    return _maddubs(k, w_abs, k.op(f"call {BYTES} @llvm.x86.avx2.psign.b({BYTES} {signed}, {BYTES} {w})"))


def _sdot(k, acc: str, a: str, w: str) -> str:
    """acc + the <8 x i32> lane sums (4 neighbours each) of signed bytes a times signed bytes w,
    with aarch64's sdot on each 16-byte half."""
    halves = []
    for first in (0, 16):
        pick = f"<16 x i32> <{', '.join(f'i32 {i}' for i in range(first, first + 16))}>"
        x, y = (k.op(f"shufflevector {BYTES} {v}, {BYTES} poison, {pick}") for v in (a, w))
        start = k.op(f"shufflevector {SUMS} {acc}, {SUMS} poison, <4 x i32> "
                     f"<{', '.join(f'i32 {i}' for i in range(first // 4, first // 4 + 4))}>")
        halves.append(k.op(f"call <4 x i32> @llvm.aarch64.neon.sdot.v4i32.v16i8(<4 x i32> {start}, <16 x i8> {x}, <16 x i8> {y})"))
    return k.concat(halves[0], halves[1], 4, "i32")


def _pair_sums(k, u: str, s: str) -> str:
    """pmaddubsw: unsigned bytes u times signed bytes s, neighbours added into <16 x i16>
    (saturating)."""
    return k.op(f"call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw({BYTES} {u}, {BYTES} {s})")


def _maddubs(k, u: str, s: str) -> str:
    """Unsigned bytes u times signed bytes s, summed in fours into i32 lanes (AVX2)."""
    return _scaled(k, _pair_sums(k, u, s), constant(0x10001, LANES, INT))  # times 1 in both halves



def bitfield(k, v: str, shift, mask: int, n: int = BLOCK) -> str:
    """(v >> shift) & mask, bytewise, for an <n x i8>; shift a constant or an i64 known only
    when the kernel runs."""
    if isinstance(shift, str):
        v = k.op(f"lshr <{n} x i8> {v}, {k.splat(k.op(f'trunc i64 {shift} to i8'), n, 'i8')}")
    elif shift:
        v = k.op(f"lshr <{n} x i8> {v}, {constant(shift, n)}")
    return k.op(f"and <{n} x i8> {v}, {constant(mask, n)}")
