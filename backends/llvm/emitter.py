"""Straight-line LLVM IR, as text: values, loads and stores, and the instructions of a program.

An Emitter appends instructions and names their results (%t1, %t2, ...). Values live as float
(every float dtype), iN (ints) or i1 (bool); float16/bfloat16 are widened when loaded and rounded
when stored, and after every instruction whose result has a half dtype, so a fused kernel rounds
exactly where the unfused ops would. Control flow (loops, branches, phis) is kernel.py's job.
"""
import struct

from backends.llvm.target import host
from ops import dtypes

STORAGE = {"float32": "float", "float16": "half", "bfloat16": "i16", "int8": "i8", "int32": "i32",
           "int64": "i64", "bool": "i8"}


def compute_type(d) -> str:
    return "float" if d.is_float else "i1" if d == dtypes.bool_ else STORAGE[d.name]


def float_literal(v) -> str:
    """LLVM spells a float constant as the 64-bit hex of the same value as a double."""
    import numpy as np
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", float(np.float32(v))))[0]


def constant(value: int, n: int, element: str = "i8") -> str:
    """An <n x element> vector with every lane `value`, as a literal."""
    return "<" + ", ".join([f"{element} {value}"] * n) + ">"


class Emitter:
    def __init__(self):
        self.lines, self.n = [], 0

    def tmp(self) -> str:
        self.n += 1
        return f"%t{self.n}"

    def op(self, text: str) -> str:
        r = self.tmp()
        self.lines.append(f"  {r} = {text}")
        return r

    def raw(self, text: str):
        self.lines.append(text)

    # ---- memory ---------------------------------------------------------------------------------
    def block_scale(self, ptr: str) -> str:
        """A block's float16 scale (or minimum), as a float. On x86 a load from HALF_TABLE, as
        ggml's x86 builds convert theirs: vcvtph2ps takes a slot of the vector units that the
        byte products need, and with one or two scales per 32 weights this was a quarter of the
        AVX2 decode kernel's work (SmolLM2 Q4_1's AVX2 step went from 5.3 to 4.0 ms on an
        Emerald Rapids, its AVX-512 step from 3.8 to 3.7). aarch64 converts in one cheap fcvt."""
        if host().arch != "x86_64":
            return self.load(ptr, dtypes.float16)
        bits = self.op(f"zext i16 {self.op(f'load i16, ptr {ptr}, align 1')} to i64")
        return self.op(f"load float, ptr {self.op(f'getelementptr float, ptr @{HALF_TABLE}, i64 {bits}')}, align 4")

    def load(self, ptr: str, d) -> str:
        v = self.op(f"load {STORAGE[d.name]}, ptr {ptr}")
        if d == dtypes.float16:
            return self.op(f"fpext half {v} to float")
        if d == dtypes.bfloat16:
            wide = self.op(f"zext i16 {v} to i32")
            return self.op(f"bitcast i32 {self.op(f'shl i32 {wide}, 16')} to float")
        if d == dtypes.bool_:
            return self.op(f"icmp ne i8 {v}, 0")
        return v

    def load_bf16_pairs(self, ptr: str, n: int = 1) -> tuple[str, str]:
        """n adjacent pairs of bfloat16 values read as i32s and widened: the low ones are
        (bits << 16), the high ones (bits & 0xffff0000), one integer op each. Floats for n = 1,
        else <n x float>s."""
        words, v = ("i32", "float") if n == 1 else (f"<{n} x i32>", f"<{n} x float>")
        shift, mask = ("16", "-65536") if n == 1 else (constant(16, n, "i32"), constant(-65536, n, "i32"))
        bits = self.op(f"load {words}, ptr {ptr}, align 2")
        low, high = self.op(f"shl {words} {bits}, {shift}"), self.op(f"and {words} {bits}, {mask}")
        return self.op(f"bitcast {words} {low} to {v}"), self.op(f"bitcast {words} {high} to {v}")

    def store(self, value: str, ptr: str, d):
        if d == dtypes.float16:
            value = self.op(f"fptrunc float {value} to half")
        elif d == dtypes.bfloat16:
            bits = self.op(f"bitcast float {self.round_bf16(value)} to i32")
            value = self.op(f"trunc i32 {self.op(f'lshr i32 {bits}, 16')} to i16")
        elif d == dtypes.bool_:
            value = self.op(f"zext i1 {value} to i8")
        self.raw(f"  store {STORAGE[d.name]} {value}, ptr {ptr}")

    def fma(self, a: str, b: str, c: str, t: str = "float") -> str:
        """a * b + c rounded once (t: float or <n x float>), by instruction: contraction (fmul
        and fadd marked `contract`) is an option a backend may take at one place and not at the
        next, and a row's sums must be the same bits in every kernel."""
        suffix = "f32" if t == "float" else f"v{t.strip('<>').split(' x ')[0]}f32"
        return self.op(f"call {t} @llvm.fma.{suffix}({t} {a}, {t} {b}, {t} {c})")

    def round_bf16(self, x: str) -> str:
        """Round a float to the nearest bfloat16 (ties to even), keeping NaN a NaN."""
        bits = self.op(f"bitcast float {x} to i32")
        lsb = self.op(f"and i32 {self.op(f'lshr i32 {bits}, 16')}, 1")
        rounded = self.op(f"add i32 {bits}, {self.op(f'add i32 {lsb}, 32767')}")
        quiet = self.op(f"or i32 {bits}, 4194304")
        isnan = self.op(f"fcmp uno float {x}, {x}")
        kept = self.op(f"and i32 {self.op(f'select i1 {isnan}, i32 {quiet}, i32 {rounded}')}, -65536")
        return self.op(f"bitcast i32 {kept} to float")

    def exp(self, x: str, lanes: int = 1) -> str:
        """e^x in plain arithmetic, so that loops vectorise (llvm.exp becomes a scalar libm call
        per element): Cody-Waite reduction x = n ln2 + r, a degree-7 polynomial for e^r
        (Cephes' expf, within 2 ulp), times 2^n built from exponent bits in two halves, so that
        results underflow gradually and overflow to inf as they should. lanes > 1: of each lane
        of a <lanes x float>, the same operations."""
        f, i, b = ("float", "i32", "i1") if lanes == 1 else (f"<{lanes} x float>", f"<{lanes} x i32>", f"<{lanes} x i1>")
        v = "f32" if lanes == 1 else f"v{lanes}f32"

        def lit(c, kind="float"):
            one = float_literal(c) if kind == "float" else c
            return one if lanes == 1 else constant(one, lanes, kind)
        low = self.op(f"call {f} @llvm.maxnum.{v}({f} {x}, {f} {lit(-104.0)})")
        clamped = self.op(f"call {f} @llvm.minnum.{v}({f} {low}, {f} {lit(89.0)})")
        n = self.op(f"call {f} @llvm.rint.{v}({f} {self.op(f'fmul {f} {clamped}, {lit(1.44269504088896341)}')})")
        r = self.op(f"fsub {f} {clamped}, {self.op(f'fmul {f} {n}, {lit(0.693359375)}')}")
        r = self.op(f"fsub {f} {r}, {self.op(f'fmul {f} {n}, {lit(-2.12194440e-4)}')}")
        p = lit(1.9875691500e-4)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = self.op(f"fadd {f} {self.op(f'fmul {f} {p}, {r}')}, {lit(c)}")
        r2 = self.op(f"fmul {f} {r}, {r}")
        poly = self.op(f"fadd {f} {self.op(f'fmul {f} {r2}, {p}')}, {r}")
        poly = self.op(f"fadd {f} {poly}, {lit(1.0)}")
        whole = self.op(f"fptosi {f} {n} to {i}")
        one, bias, shift = lit(1, "i32"), lit(127, "i32"), lit(23, "i32")
        half = self.op(f"ashr {i} {whole}, {one}")
        scales = []
        for h in (half, self.op(f"sub {i} {whole}, {half}")):
            biased = self.op(f"add {i} {h}, {bias}")
            scales.append(self.op(f"bitcast {i} {self.op(f'shl {i} {biased}, {shift}')} to {f}"))
        y = self.op(f"fmul {f} {self.op(f'fmul {f} {poly}, {scales[0]}')}, {scales[1]}")
        return self.op(f"select {b} {self.op(f'fcmp uno {f} {x}, {x}')}, {f} {x}, {f} {y}")

    def round_to(self, x: str, d) -> str:
        if d == dtypes.float16:
            return self.op(f"fpext half {self.op(f'fptrunc float {x} to half')} to float")
        if d == dtypes.bfloat16:
            return self.round_bf16(x)
        return x

    # ---- one instruction ------------------------------------------------------------------------
    def instruction(self, op: str, arg, args: list[str], in_types: list, out) -> str:
        t = compute_type(in_types[0]) if in_types else compute_type(out)
        f = t == "float"
        x = args[0] if args else None
        if op == "const":
            value = arg[0]
            if out.is_float:
                return self.op(f"fadd float {float_literal(value)}, 0.0")
            return self.op(f"add {t} {int(bool(value)) if t == 'i1' else int(value)}, 0")
        if op == "cast":
            return self.round_to(self.cast(x, in_types[0], out), out)
        if op == "where":
            return self.op(f"select i1 {x}, {compute_type(out)} {args[1]}, {compute_type(out)} {args[2]}")
        simple = BINARY_FLOAT if f else BINARY_INT
        if op in simple:
            return self.op(simple[op].format(t=t, a=x, b=args[1]))
        if op in COMPARE:
            pred = COMPARE[op][0 if f else 1]
            return self.op(f"{'fcmp' if f else 'icmp'} {pred} {t} {x}, {args[1]}")
        if op in ("maximum", "minimum"):
            if f:
                return self.op(f"call float @llvm.{op}.f32(float {x}, float {args[1]})")
            if t == "i1":
                return self.op(f"{'or' if op == 'maximum' else 'and'} i1 {x}, {args[1]}")
            return self.op(f"call {t} @llvm.s{op[:3]}.{t}({t} {x}, {t} {args[1]})")
        return self.unary(op, x, t)

    def unary(self, op: str, x: str, t: str) -> str:
        if t != "float":
            if op == "neg":
                return self.op(f"sub {t} 0, {x}")
            if op == "abs":
                return self.op(f"call {t} @llvm.abs.{t}({t} {x}, i1 false)")
            if op == "relu":
                return self.op(f"call {t} @llvm.smax.{t}({t} {x}, {t} 0)")
            raise NotImplementedError(op)
        if op == "neg":
            return self.op(f"fneg float {x}")
        if op == "rsqrt":
            return self.op(f"fdiv float 1.0, {self.op(f'call float @llvm.sqrt.f32(float {x})')}")
        if op == "relu":
            return self.op(f"call float @llvm.maximum.f32(float {x}, float 0.0)")
        if op == "exp":
            return self.exp(x)
        if op in ("sigmoid", "silu"):
            e = self.exp(self.op(f"fneg float {x}"))
            s = self.op(f"fdiv float 1.0, {self.op(f'fadd float 1.0, {e}')}")
            return s if op == "sigmoid" else self.op(f"fmul float {x}, {s}")
        if op == "tanh":
            return self.op(f"call float @tanhf(float {x})")
        if op == "gelu":  # x * Phi(x) = x/2 (1 + erf(x / sqrt 2)), the C library's erf as PyTorch's
            erf = self.op(f"call float @erff(float {self.op(f'fmul float {x}, {float_literal(0.5 ** 0.5)}')})")
            return self.op(f"fmul float {self.op(f'fmul float {x}, 0.5')}, {self.op(f'fadd float 1.0, {erf}')}")
        return self.op(f"call float @llvm.{UNARY_INTRINSIC[op]}.f32(float {x})")

    def cast(self, x: str, src, dst) -> str:
        s, d = compute_type(src), compute_type(dst)
        if s == d:
            return x
        if d == "i1":
            return self.op(f"fcmp une float {x}, 0.0" if s == "float" else f"icmp ne {s} {x}, 0")
        if s == "float":
            return self.op(f"fptosi float {x} to {d}")
        if d == "float":
            return self.op(f"{'uitofp' if s == 'i1' else 'sitofp'} {s} {x} to float")
        bits = {"i1": 1, "i8": 8, "i32": 32, "i64": 64}
        if bits[s] < bits[d]:
            return self.op(f"{'zext' if s == 'i1' else 'sext'} {s} {x} to {d}")
        return self.op(f"trunc {s} {x} to {d}")


BINARY_FLOAT = {"add": "fadd {t} {a}, {b}", "sub": "fsub {t} {a}, {b}", "mul": "fmul {t} {a}, {b}",
                "div": "fdiv {t} {a}, {b}", "pow": "call float @llvm.pow.f32(float {a}, float {b})"}
BINARY_INT = {"add": "add {t} {a}, {b}", "sub": "sub {t} {a}, {b}", "mul": "mul {t} {a}, {b}"}
COMPARE = {"cmplt": ("olt", "slt"), "cmple": ("ole", "sle"), "cmpgt": ("ogt", "sgt"),
           "cmpge": ("oge", "sge"), "cmpeq": ("oeq", "eq"), "cmpne": ("une", "ne")}
UNARY_INTRINSIC = {"log": "log", "sqrt": "sqrt", "sin": "sin", "cos": "cos", "abs": "fabs"}

# every float16's value as a float32, indexed by its bits: an array the compiler gives the
# kernels (compiler.py), found by name when their object code is loaded
HALF_TABLE = "tt_half_to_float"

DECLARATIONS = f"""
@{HALF_TABLE} = external global [65536 x float]
declare float @llvm.log.f32(float)
declare float @llvm.sqrt.f32(float)
declare float @llvm.sin.f32(float)
declare float @llvm.cos.f32(float)
declare float @llvm.fabs.f32(float)
declare float @llvm.pow.f32(float, float)
declare float @llvm.maximum.f32(float, float)
declare float @llvm.maxnum.f32(float, float)
declare float @llvm.minnum.f32(float, float)
declare float @llvm.rint.f32(float)
declare float @llvm.minimum.f32(float, float)
declare float @tanhf(float)
declare float @erff(float)
declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
declare <32 x float> @llvm.fabs.v32f32(<32 x float>)
declare <32 x float> @llvm.roundeven.v32f32(<32 x float>)
declare <32 x float> @llvm.maxnum.v32f32(<32 x float>, <32 x float>)
declare float @llvm.vector.reduce.fmax.v32f32(<32 x float>)
declare i32 @llvm.vector.reduce.add.v32i32(<32 x i32>)
declare i8 @llvm.vector.reduce.or.v16i8(<16 x i8>)
declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)
declare <32 x i8> @llvm.abs.v32i8(<32 x i8>, i1)
declare <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32>, <32 x i8>, <32 x i8>)
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
""" + "".join(f"declare {t} @llvm.{f}.{t}({t}, {t})\n" for t in ("i8", "i32", "i64") for f in ("smax", "smin")) \
    + "".join(f"declare {t} @llvm.abs.{t}({t}, i1)\n" for t in ("i8", "i32", "i64"))


# ---- programs -------------------------------------------------------------------------------------

def evaluate(e: Emitter, program, in_types, loaded: list[str]) -> str:
    """Emit a program's instructions on already-loaded input values; return the result."""
    values, types = list(loaded), list(in_types)
    for op, arg, operands, out in program:
        result = e.instruction(op, arg, [values[i] for i in operands], [types[i] for i in operands], out)
        if op not in ("cast", "const"):
            result = e.round_to(result, out) if out.is_float else result
        values.append(result)
        types.append(out)
    return values[-1]
