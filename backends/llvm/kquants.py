"""The K-quants' super-blocks (ops/kquants.py has their byte layout) read one sub-block of 32
values at a time into blocks.Block, as blocks.read_block reads the simple formats: the same
integers, scales and minimums as ops.kquants.sub_blocks, each scale and minimum one float32
multiply as there. `sub` is known when the kernel is built, so which bytes and bits a sub-block
takes is fixed code; a super-block's sub-blocks are read in one straight run, where LLVM loads
their shared bytes once."""
from backends.llvm.blocks import BYTES, F16, LANES, Block
from backends.llvm.emitter import constant
from ops.blocks import BLOCK, Format


def read_sub_block(k, f: Format, at: str, sub: int) -> Block:
    """Sub-block `sub` (0-7) of the super-block at address `at`."""
    if f.name == "q6_k":
        h, t = divmod(sub, 4)
        ql = k.vload(k.at(at, 64 * h + 32 * (t % 2), "i8"), BLOCK, "i8")
        low = _bits(k, ql, 4 * (t // 2), 15)
        qh = k.vload(k.at(at, 128 + 32 * h, "i8"), BLOCK, "i8")
        high = k.op(f"shl {BYTES} {_bits(k, qh, 2 * t, 3)}, {constant(4, BLOCK)}")
        w = k.op(f"sub {BYTES} {k.op(f'or {BYTES} {low}, {high}')}, {constant(32, BLOCK)}")
        d = k.load(k.at(at, 208, "i8"), F16)
        first, second = (k.op(f"fmul float {d}, {k.op(f'sitofp i8 {_byte(k, at, 192 + 8 * h + 2 * t + j)} to float')}")
                         for j in (0, 1))
        pair = k.op(f"insertelement <2 x float> {k.op(f'insertelement <2 x float> poison, float {first}, i32 0')}, "
                    f"float {second}, i32 1")  # values 0-15 are lanes 0-3, 16-31 lanes 4-7
        lanes = ", ".join(["i32 0"] * (LANES // 2) + ["i32 1"] * (LANES // 2))
        return Block(w, k.op(f"shufflevector <2 x float> {pair}, <2 x float> poison, <{LANES} x i32> <{lanes}>"), None)
    qs = k.vload(k.at(at, f.block_bytes - 128 + 32 * (sub // 2), "i8"), BLOCK, "i8")
    w = _bits(k, qs, 4 * (sub % 2), 15)
    if f.high_bits:  # q5_k: bit `sub` of qh[l] is value l's fifth bit
        fifth = _bits(k, k.vload(k.at(at, 16, "i8"), BLOCK, "i8"), sub, 1)
        w = k.op(f"or {BYTES} {w}, {k.op(f'shl {BYTES} {fifth}, {constant(4, BLOCK)}')}")
    sc, mn = _scale_min(k, at, sub)
    scale = k.op(f"fmul float {k.load(at, F16)}, {k.op(f'uitofp i32 {sc} to float')}")
    minimum = k.op(f"fmul float {k.load(k.at(at, 2, 'i8'), F16)}, {k.op(f'uitofp i32 {mn} to float')}")
    return Block(w, k.splat(scale, LANES), k.op(f"fneg float {minimum}"))


def _scale_min(k, at: str, j: int) -> tuple[str, str]:
    """Sub-block j's 6-bit scale and minimum (i32) from the 12 bytes at at + 4 (ops.kquants.scale_min)."""
    b = lambda i: k.op(f"zext i8 {_byte(k, at, 4 + i)} to i32")  # noqa: E731
    if j < 4:
        return k.op(f"and i32 {b(j)}, 63"), k.op(f"and i32 {b(j + 4)}, 63")
    top = lambda i: k.op(f"shl i32 {k.op(f'lshr i32 {b(i)}, 6')}, 4")  # noqa: E731
    return (k.op(f"or i32 {k.op(f'and i32 {b(j + 4)}, 15')}, {top(j - 4)}"),
            k.op(f"or i32 {k.op(f'lshr i32 {b(j + 4)}, 4')}, {top(j)}"))


def _bits(k, v: str, shift: int, mask: int) -> str:
    """(v >> shift) & mask, bytewise."""
    if shift:
        v = k.op(f"lshr {BYTES} {v}, {constant(shift, BLOCK)}")
    return k.op(f"and {BYTES} {v}, {constant(mask, BLOCK)}")


def _byte(k, at: str, offset: int) -> str:
    return k.op(f"load i8, ptr {k.at(at, offset, 'i8')}, align 1")
