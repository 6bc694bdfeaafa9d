"""Each kernel's arguments, written once: the IR function header and the ctypes argument types
both come from its Signature, so the two can never disagree.

Every kernel returns void and takes a range of work first (the threads split it), then what
it reads and writes. Pointers to arrays the kernel owns for the call are `noalias`, which lets
the vectoriser keep values in registers.
"""
import ctypes
from dataclasses import dataclass

INT, PTR, ARRAY = "i64", "ptr", "ptr noalias"  # an integer, a pointer, an array no other pointer aliases
CTYPES = {INT: ctypes.c_int64, PTR: ctypes.c_void_p, ARRAY: ctypes.c_void_p}


@dataclass(frozen=True)
class Signature:
    params: tuple[tuple[str, str], ...]  # (IR name, kind)

    def header(self, name: str) -> str:
        """`define void @name(...) {`, the first line of the kernel's IR."""
        return f"define void @{name}(" + ", ".join(f"{kind} %{param}" for param, kind in self.params) + ") {"

    @property
    def argtypes(self) -> list:
        return [CTYPES[kind] for _, kind in self.params]


def loop(operands: int) -> Signature:
    """Elementwise and reduce loop nests: a range of the outermost axis, the dims and per-operand
    strides (in elements), then the output and the inputs."""
    return Signature((("start", INT), ("end", INT), ("dims", PTR), ("strides", PTR),
                      *((f"p{i}", ARRAY) for i in range(operands))))


def matmul_nt(weights: int, extras: int, quantised: bool = False) -> Signature:
    """C = epilogue(A @ W1.T, ..., E1, ...): columns n0..n1, M rows, K deep; each array with its
    leading dimension. Quantised (block weights): A is the rows' q8 blocks as
    ops.blocks.quantize_rows makes them: the bytes (rows K apart), AD the scales and AS the scaled
    sums (rows K / 32 apart)."""
    a = (("A", ARRAY), ("AD", ARRAY), ("AS", ARRAY)) if quantised else (("A", ARRAY), ("lda", INT))
    return Signature((("n0", INT), ("n1", INT), ("M", INT), ("K", INT), *a,
                      *(p for i in range(weights) for p in ((f"W{i}", ARRAY), (f"ldw{i}", INT))),
                      ("C", ARRAY), ("ldc", INT),
                      *(p for i in range(extras) for p in ((f"E{i}", ARRAY), (f"lde{i}", INT)))))


QUANTIZE_ROWS = Signature((("r0", INT), ("r1", INT), ("K", INT), ("X", ARRAY), ("ldx", INT), ("Q", ARRAY),
                           ("D", ARRAY), ("S", ARRAY)))
"""Rows r0..r1 of X quantised to 8 bits (ops.blocks.quantize_rows, one scale per group of 32 or
256 values): Q [*, K], D and S per block of 32 [*, K / 32]."""

MATMUL_NN = Signature((("m0", INT), ("m1", INT), ("N", INT), ("K", INT), ("A", ARRAY), ("lda", INT),
                       ("B", ARRAY), ("ldb", INT), ("C", ARRAY), ("ldc", INT)))
"""C[m0..m1, :] = A @ B for B with unit-stride rows (p @ v)."""

ATTENTION = Signature((("r0", INT), ("r1", INT), ("table", ARRAY), ("K", ARRAY), ("ldk", INT), ("V", ARRAY),
                       ("ldv", INT), ("S", INT), ("D", INT), ("DV", INT), ("mstride", INT)))
"""Rows r0..r1 of the table of (q row, out row, mask row) addresses, over S keys of K and V."""

ASSIGN_AT = Signature((("o0", INT), ("o1", INT), ("T", PTR), ("V", PTR), ("start", PTR), ("n", INT), ("length", INT),
                       ("t_outer", INT), ("t_axis", INT), ("v_outer", INT), ("v_axis", INT), ("bytes", INT)))
"""Outer indices o0..o1 of T[outer, length, bytes] <- V[outer, n, bytes] from T's index *start on
its middle axis (strides in bytes)."""
