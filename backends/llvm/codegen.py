"""LLVM IR for kernels, as text.

A kernel evaluates a *program* — a short list of elementwise instructions over its inputs, as the
fusion pass leaves them (one instruction when nothing was fused) — inside a loop nest over the
output, optionally reducing the innermost axis. Values live as float (every float dtype),
iN (ints) or i1 (bool); float16/bfloat16 are widened when loaded and rounded when stored, and
after every instruction whose result has a half dtype, so a fused kernel rounds exactly where the
unfused ops would.

Strides are in elements; the innermost stride of each operand is baked in when it is 0 or 1, so
the loop vectoriser sees a unit-stride or broadcast stream.
"""
import struct

from backends.llvm import signatures
from ops import dtypes

STORAGE = {"float32": "float", "float16": "half", "bfloat16": "i16", "int8": "i8", "int32": "i32",
           "int64": "i64", "bool": "i8"}


def compute_type(d) -> str:
    return "float" if d.is_float else "i1" if d == dtypes.bool_ else STORAGE[d.name]


def float_literal(v) -> str:
    """LLVM spells a float constant as the 64-bit hex of the same value as a double."""
    import numpy as np
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", float(np.float32(v))))[0]


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

    def store(self, value: str, ptr: str, d):
        if d == dtypes.float16:
            value = self.op(f"fptrunc float {value} to half")
        elif d == dtypes.bfloat16:
            bits = self.op(f"bitcast float {self.round_bf16(value)} to i32")
            value = self.op(f"trunc i32 {self.op(f'lshr i32 {bits}, 16')} to i16")
        elif d == dtypes.bool_:
            value = self.op(f"zext i1 {value} to i8")
        self.raw(f"  store {STORAGE[d.name]} {value}, ptr {ptr}")

    def round_bf16(self, x: str) -> str:
        """Round a float to the nearest bfloat16 (ties to even), keeping NaN a NaN."""
        bits = self.op(f"bitcast float {x} to i32")
        lsb = self.op(f"and i32 {self.op(f'lshr i32 {bits}, 16')}, 1")
        rounded = self.op(f"add i32 {bits}, {self.op(f'add i32 {lsb}, 32767')}")
        quiet = self.op(f"or i32 {bits}, 4194304")
        isnan = self.op(f"fcmp uno float {x}, {x}")
        kept = self.op(f"and i32 {self.op(f'select i1 {isnan}, i32 {quiet}, i32 {rounded}')}, -65536")
        return self.op(f"bitcast i32 {kept} to float")

    def exp(self, x: str) -> str:
        """e^x in plain arithmetic, so that loops vectorise (llvm.exp becomes a scalar libm call
        per element): Cody-Waite reduction x = n ln2 + r, a degree-7 polynomial for e^r
        (Cephes' expf, within 2 ulp), times 2^n built from exponent bits in two halves, so that
        results underflow gradually and overflow to inf as they should."""
        lit = float_literal
        low = self.op(f"call float @llvm.maxnum.f32(float {x}, float {lit(-104.0)})")
        clamped = self.op(f"call float @llvm.minnum.f32(float {low}, float {lit(89.0)})")
        n = self.op(f"call float @llvm.rint.f32(float {self.op(f'fmul float {clamped}, {lit(1.44269504088896341)}')})")
        r = self.op(f"fsub float {clamped}, {self.op(f'fmul float {n}, {lit(0.693359375)}')}")
        r = self.op(f"fsub float {r}, {self.op(f'fmul float {n}, {lit(-2.12194440e-4)}')}")
        p = lit(1.9875691500e-4)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = self.op(f"fadd float {self.op(f'fmul float {p}, {r}')}, {lit(c)}")
        r2 = self.op(f"fmul float {r}, {r}")
        poly = self.op(f"fadd float {self.op(f'fmul float {r2}, {p}')}, {r}")
        poly = self.op(f"fadd float {poly}, 1.0")
        whole = self.op(f"fptosi float {n} to i32")
        half = self.op(f"ashr i32 {whole}, 1")
        scales = []
        for h in (half, self.op(f"sub i32 {whole}, {half}")):
            biased = self.op(f"add i32 {h}, 127")
            scales.append(self.op(f"bitcast i32 {self.op(f'shl i32 {biased}, 23')} to float"))
        y = self.op(f"fmul float {self.op(f'fmul float {poly}, {scales[0]}')}, {scales[1]}")
        return self.op(f"select i1 {self.op(f'fcmp uno float {x}, {x}')}, float {x}, float {y}")

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

DECLARATIONS = """
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


def elementwise_kernel(name: str, program, in_types, out_type, rank: int, inner_strides) -> str:
    """void name(i64 start, i64 end, ptr dims, ptr strides, ptr out, ptr in0, ...): the
    outermost axis runs from start to end (a thread's share); strides[j * rank + d] is operand
    j's stride (j = 0 is the output) along axis d."""
    return _loop_kernel(name, program, in_types, out_type, rank, inner_strides, reduce=None)


def reduce_kernel(name: str, program, in_types, out_type, rank: int, inner_strides, reduce: str) -> str:
    """Like elementwise_kernel, but the innermost axis is reduced (sum, max or min) into one
    output element per outer index: the output's innermost stride is ignored."""
    return _loop_kernel(name, program, in_types, out_type, rank, inner_strides, reduce=reduce)


def _loop_kernel(name, program, in_types, out_type, rank, inner_strides, reduce):
    n_ops = len(in_types) + 1
    e = Emitter()
    types = [out_type, *in_types]
    e.raw(signatures.loop(n_ops).header(name))
    e.raw("entry:")
    dims = [e.op(f"load i64, ptr {e.op(f'getelementptr i64, ptr %dims, i64 {d}')}") for d in range(rank)]
    stride = {}
    for j in range(n_ops):
        for d in range(rank):
            fixed = inner_strides[j] if d == rank - 1 else None
            stride[j, d] = str(fixed) if fixed is not None else \
                e.op(f"load i64, ptr {e.op(f'getelementptr i64, ptr %strides, i64 {j * rank + d}')}")
    base = {j: "0" for j in range(n_ops)}
    e.raw("  br label %loop0.pre")
    _emit_loops(e, 0, rank, dims, stride, base, types, program, reduce)
    e.raw("exit:\n  ret void\n}")
    return DECLARATIONS + "\n".join(e.lines) + "\n"


def _emit_loops(e, d, rank, dims, stride, base, types, program, reduce):
    """Loop d over its axis; the innermost loop body evaluates the program (and reduces)."""
    n_ops = len(types)
    lo, hi = ("%start", "%end") if d == 0 else ("0", dims[d])
    after = "exit" if d == 0 else f"loop{d - 1}.latch"
    innermost = d == rank - 1
    e.raw(f"loop{d}.pre:")
    e.raw(f"  %empty{d} = icmp sge i64 {lo}, {hi}")
    init = ""
    if innermost and reduce:
        init = _identity(reduce, types[0])
    e.raw(f"  br i1 %empty{d}, label %loop{d}.done, label %loop{d}")
    e.raw(f"loop{d}:")
    e.raw(f"  %i{d} = phi i64 [{lo}, %loop{d}.pre], [%i{d}.next, %loop{d}.latch]")
    acc_type = compute_type(types[0]) if reduce else None
    if innermost and reduce:
        e.raw(f"  %acc = phi {acc_type} [{init}, %loop{d}.pre], [%acc.next, %loop{d}.latch]")
    offsets = {j: e.op(f"add i64 {base[j]}, {e.op(f'mul i64 %i{d}, {stride[j, d]}')}") for j in range(n_ops)}
    if innermost:
        loaded = [e.load(e.op(f"getelementptr {STORAGE[types[j].name]}, ptr %p{j}, i64 {offsets[j]}"), types[j])
                  for j in range(1, n_ops)]
        value = evaluate(e, program, types[1:], loaded)
        if reduce:
            e.raw(f"  %acc.next = {_combine(reduce, acc_type, '%acc', value)}")
        else:
            e.store(value, e.op(f"getelementptr {STORAGE[types[0].name]}, ptr %p0, i64 {offsets[0]}"), types[0])
        e.raw(f"  br label %loop{d}.latch")
    else:
        e.raw(f"  br label %loop{d + 1}.pre")
        _emit_loops(e, d + 1, rank, dims, stride, offsets, types, program, reduce)
    e.raw(f"loop{d}.latch:")
    e.raw(f"  %i{d}.next = add i64 %i{d}, 1")
    e.raw(f"  %more{d} = icmp slt i64 %i{d}.next, {hi}")
    e.raw(f"  br i1 %more{d}, label %loop{d}, label %loop{d}.done")
    e.raw(f"loop{d}.done:")
    if innermost and reduce:
        e.raw(f"  %acc.out = phi {acc_type} [{init}, %loop{d}.pre], [%acc.next, %loop{d}.latch]")
        e.store("%acc.out", e.op(f"getelementptr {STORAGE[types[0].name]}, ptr %p0, i64 {base[0]}"), types[0])
    e.raw(f"  br label %{after}")


def _identity(reduce, d) -> str:
    t = compute_type(d)
    if reduce == "sum":
        return "0.0" if t == "float" else "0"
    if t == "float":
        return "0xFFF0000000000000" if reduce == "max" else "0x7FF0000000000000"
    if t == "i1":
        return "false" if reduce == "max" else "true"
    bits = {"i8": 8, "i32": 32, "i64": 64}[t]
    return str(-(1 << (bits - 1))) if reduce == "max" else str((1 << (bits - 1)) - 1)


def _combine(reduce, t, acc, value) -> str:
    if reduce == "sum":
        # reassoc lets LLVM keep several partial sums in vector registers
        return f"fadd reassoc {t} {acc}, {value}" if t == "float" else f"add {t} {acc}, {value}"
    if t == "float":
        return f"call float @llvm.{'maximum' if reduce == 'max' else 'minimum'}.f32(float {acc}, float {value})"
    if t == "i1":
        return f"{'or' if reduce == 'max' else 'and'} i1 {acc}, {value}"
    return f"call {t} @llvm.s{reduce}.{t}({t} {acc}, {t} {value})"


# ---- matrix products ------------------------------------------------------------------------------

def matmul_nt_kernel(name: str, a_type, w_types, c_type, mr: int, nr: int, extra_types=(), program=()) -> str:
    """C[m, n] = epilogue(sum_k A[m, k] * W1[n, k], ..., sum_k A[m, k] * Wj[n, k], E1[m, n], ...):
    A and every W run along k with unit stride, the form of x @ W.T with PyTorch-layout weights.
    Each step computes an mr x nr block of C from mr rows of A and nr rows of each weight, so
    every weight element loaded feeds mr multiply-adds; the k loop is a set of reductions the
    vectoriser turns into vector accumulators. With M = 1 (decode) this streams each weight row
    exactly once. The epilogue program (ops.fused) reads the j products then the extras, and runs
    as each element is stored; none means the first product.

    void name(i64 n0, i64 n1, i64 M, i64 K, ptr A, i64 lda, (ptr W, i64 ldw) x j, ptr C, i64 ldc,
    (ptr E, i64 lde) x extras): columns n0..n1 (a multiple of nr) and all M rows (a multiple of mr).
    With bfloat16 weights A's rows must be pair-major (see pair_major)."""
    e = Emitter()
    j = len(w_types)
    e.raw(signatures.matmul_nt(j, len(extra_types)).header(name))
    e.raw("entry:\n  %none = icmp sge i64 %n0, %n1\n  br i1 %none, label %exit, label %n.loop")
    e.raw("n.loop:\n  %n = phi i64 [%n0, %entry], [%n.next, %m.done]")
    e.raw("  br label %m.loop")
    e.raw("m.loop:\n  %m = phi i64 [0, %n.loop], [%m.next, %k.end]")
    rows = [e.op(f"mul i64 {e.op(f'add i64 %m, {r}')}, %lda") for r in range(mr)]
    cols = [[e.op(f"mul i64 {e.op(f'add i64 %n, {c}')}, %ldw{i}") for c in range(nr)] for i in range(j)]
    accs = [(i, r, c) for i in range(j) for r in range(mr) for c in range(nr)]
    # bfloat16 weights are read two at a time as one i32: the low one is (bits << 16), the high
    # one (bits & 0xffff0000), one integer op each, against a shuffle and a shift per element
    pairs = pair_major(w_types)
    steps = e.op("ashr i64 %K, 1") if pairs else "%K"
    e.raw(f"  %kempty = icmp sle i64 {steps}, 0\n  br i1 %kempty, label %k.done, label %k.loop")
    e.raw("k.loop:\n  %k = phi i64 [0, %m.loop], [%k.next, %k.loop]")
    for i, r, c in accs:
        e.raw(f"  %acc{i}_{r}_{c} = phi float [0.0, %m.loop], [%acc{i}_{r}_{c}.next, %k.loop]")
    terms = _pair_terms(e, a_type, rows, cols, j, mr, nr) if pairs else _terms(e, a_type, w_types, rows, cols, "%k")
    for i, r, c in accs:
        total = f"%acc{i}_{r}_{c}"
        for n, (x, y) in enumerate(terms[i][r][c]):
            product = e.op(f"fmul contract float {x}, {y}")
            name = f"%acc{i}_{r}_{c}.next" if n == len(terms[i][r][c]) - 1 else e.tmp()
            e.raw(f"  {name} = fadd reassoc contract float {total}, {product}")
            total = name
    e.raw(f"  %k.next = add i64 %k, 1\n  %k.more = icmp slt i64 %k.next, {steps}")
    e.raw("  br i1 %k.more, label %k.loop, label %k.done")
    e.raw("k.done:")
    for i, r, c in accs:
        e.raw(f"  %sum{i}_{r}_{c} = phi float [0.0, %m.loop], [%acc{i}_{r}_{c}.next, %k.loop]")
    if pairs:  # an odd K leaves one last element
        e.raw(f"  %odd = icmp ne i64 {e.op('and i64 %K, 1')}, 0\n  br i1 %odd, label %k.tail, label %k.end")
        e.raw("k.tail:")
        last = _terms(e, a_type, w_types, rows, cols, e.op("sub i64 %K, 1"))
        tails = {}
        for i, r, c in accs:
            (x, y), = last[i][r][c]
            tails[i, r, c] = e.op(f"fadd float %sum{i}_{r}_{c}, {e.op(f'fmul float {x}, {y}')}")
        e.raw("  br label %k.end\nk.end:")
        final = {(i, r, c): e.op(f"phi float [%sum{i}_{r}_{c}, %k.done], [{tails[i, r, c]}, %k.tail]")
                 for i, r, c in accs}
    else:
        e.raw("  br label %k.end\nk.end:")
        final = {(i, r, c): f"%sum{i}_{r}_{c}" for i, r, c in accs}
    for r in range(mr):
        row = e.op(f"add i64 %m, {r}")
        for c in range(nr):
            col = e.op(f"add i64 %n, {c}")
            loaded = []
            for x, t in enumerate(extra_types):
                at = e.op(f"add i64 {e.op(f'mul i64 {row}, %lde{x}')}, {col}")
                loaded.append(e.load(e.op(f"getelementptr {STORAGE[t.name]}, ptr %E{x}, i64 {at}"), t))
            products = [final[i, r, c] for i in range(j)]
            value = evaluate(e, program, [dtypes.float32] * j + list(extra_types), products + loaded) \
                if program else products[0]
            at = e.op(f"add i64 {e.op(f'mul i64 {row}, %ldc')}, {col}")
            e.store(value, e.op(f"getelementptr {STORAGE[c_type.name]}, ptr %C, i64 {at}"), c_type)
    e.raw(f"  %m.next = add i64 %m, {mr}\n  %m.more = icmp slt i64 %m.next, %M")
    e.raw("  br i1 %m.more, label %m.loop, label %m.done")
    e.raw(f"m.done:\n  %n.next = add i64 %n, {nr}\n  %n.more = icmp slt i64 %n.next, %n1")
    e.raw("  br i1 %n.more, label %n.loop, label %exit")
    e.raw("exit:\n  ret void\n}")
    return DECLARATIONS + "\n".join(e.lines) + "\n"


def pair_major(w_types) -> bool:
    """Whether matmul_nt_kernel reads A's rows pair-major: the even elements of the first
    2 * (K // 2), then the odd ones, then the last one when K is odd."""
    return all(t == dtypes.bfloat16 for t in w_types)


def _terms(e, a_type, w_types, rows, cols, k):
    """[weight][row][col] -> [(a, w)]: the products of element k."""
    a = [e.load(e.op(f"getelementptr {STORAGE[a_type.name]}, ptr %A, i64 {e.op(f'add i64 {row}, {k}')}"), a_type)
         for row in rows]
    w = [[e.load(e.op(f"getelementptr {STORAGE[t.name]}, ptr %W{i}, i64 {e.op(f'add i64 {col}, {k}')}"), t)
          for col in cols[i]] for i, t in enumerate(w_types)]
    return [[[[(a[r], w[i][c])] for c in range(len(cols[i]))] for r in range(len(rows))] for i in range(len(w_types))]


def _pair_terms(e, a_type, rows, cols, j, mr, nr):
    """Like _terms for elements 2k and 2k + 1, with bfloat16 weights read as one i32. A's rows
    come pair-major (see pair_major) so that both halves load with unit stride."""
    k0 = e.op("shl i64 %k, 1")
    odd = e.op(f"add i64 %k, {e.op('ashr i64 %K, 1')}")
    a = [[e.load(e.op(f"getelementptr {STORAGE[a_type.name]}, ptr %A, i64 {e.op(f'add i64 {row}, {k}')}"), a_type)
          for k in ("%k", odd)] for row in rows]
    w = []
    for i in range(j):
        w.append([])
        for col in cols[i]:
            at = e.op(f"getelementptr i16, ptr %W{i}, i64 {e.op(f'add i64 {col}, {k0}')}")
            bits = e.op(f"load i32, ptr {at}, align 2")
            low = e.op(f"bitcast i32 {e.op(f'shl i32 {bits}, 16')} to float")
            high = e.op(f"bitcast i32 {e.op(f'and i32 {bits}, -65536')} to float")
            w[i].append((low, high))
    return [[[[(a[r][0], w[i][c][0]), (a[r][1], w[i][c][1])] for c in range(nr)] for r in range(mr)] for i in range(j)]


def matmul_nn_kernel(name: str, a_type, b_type) -> str:
    """C[m, :] = sum_k A[m, k] * B[k, :] for B with rows of unit stride (p @ v in attention):
    the n loop is a vectorised multiply-add into a float32 row of C.

    void name(i64 m0, i64 m1, i64 N, i64 K, ptr A, i64 lda, ptr B, i64 ldb, ptr C, i64 ldc)"""
    e = Emitter()
    e.raw(signatures.MATMUL_NN.header(name))
    e.raw("entry:\n  %none = icmp sge i64 %m0, %m1\n  %empty = icmp sle i64 %N, 0\n  %skip = or i1 %none, %empty")
    e.raw("  br i1 %skip, label %exit, label %m.loop")
    e.raw("m.loop:\n  %m = phi i64 [%m0, %entry], [%m.next, %k.done]")
    crow = e.op("mul i64 %m, %ldc")
    e.raw("  br label %zero")
    e.raw("zero:\n  %z = phi i64 [0, %m.loop], [%z.next, %zero]")
    zero_at = e.op(f"add i64 {crow}, %z")
    e.raw(f"  store float 0.0, ptr {e.op(f'getelementptr float, ptr %C, i64 {zero_at}')}")
    e.raw("  %z.next = add i64 %z, 1\n  %z.more = icmp slt i64 %z.next, %N\n  br i1 %z.more, label %zero, label %k.pre")
    e.raw("k.pre:\n  %kempty = icmp sle i64 %K, 0\n  br i1 %kempty, label %k.done, label %k.loop")
    e.raw("k.loop:\n  %k = phi i64 [0, %k.pre], [%k.next, %n.done]")
    arow = e.op(f"add i64 {e.op('mul i64 %m, %lda')}, %k")
    a = e.load(e.op(f"getelementptr {STORAGE[a_type.name]}, ptr %A, i64 {arow}"), a_type)
    brow = e.op("mul i64 %k, %ldb")
    e.raw("  br label %n.loop")
    e.raw("n.loop:\n  %n = phi i64 [0, %k.loop], [%n.next, %n.loop]")
    b = e.load(e.op(f"getelementptr {STORAGE[b_type.name]}, ptr %B, i64 {e.op(f'add i64 {brow}, %n')}"), b_type)
    cptr = e.op(f"getelementptr float, ptr %C, i64 {e.op(f'add i64 {crow}, %n')}")
    old = e.op(f"load float, ptr {cptr}")
    product = e.op(f"fmul contract float {a}, {b}")
    e.raw(f"  store float {e.op(f'fadd contract float {old}, {product}')}, ptr {cptr}")
    e.raw("  %n.next = add i64 %n, 1\n  %n.more = icmp slt i64 %n.next, %N\n  br i1 %n.more, label %n.loop, label %n.done")
    e.raw("n.done:\n  %k.next = add i64 %k, 1\n  %k.more = icmp slt i64 %k.next, %K")
    e.raw("  br i1 %k.more, label %k.loop, label %k.done")
    e.raw("k.done:\n  %m.next = add i64 %m, 1\n  %m.more = icmp slt i64 %m.next, %m1")
    e.raw("  br i1 %m.more, label %m.loop, label %exit")
    e.raw("exit:\n  ret void\n}")
    return DECLARATIONS + "\n".join(e.lines) + "\n"


# ---- attention ------------------------------------------------------------------------------------

ATTENTION_BLOCK = 16  # keys whose scores are held at once: the online softmax rescales once per block


def attention_kernel(name: str, rows: int, scale: float, mask_kind) -> str:
    """out = softmax(q k^T * scale + mask) v for a tile of `rows` query rows at a time that share
    one k and v (the query heads of a grouped-query head, times the query positions), with an
    online softmax over blocks of keys: no score matrix is stored, each k and v row is loaded
    once per tile, and keys that no row of the tile may see are skipped without being read.

    void name(i64 r0, i64 r1, ptr table, ptr K, i64 ldk, ptr V, i64 ldv, i64 S, i64 D, i64 DV,
    i64 mstride): rows r0..r1 (a multiple of `rows`) of table, whose row i holds the addresses of
    its q row, out row and mask row (mask elements mstride apart along the keys)."""
    R, KB = rows, ATTENTION_BLOCK
    e = Emitter()
    e.raw(signatures.ATTENTION.header(name))
    e.raw("entry:")
    e.raw(f"  %accn = mul i64 %DV, {R}\n  %acc = alloca float, i64 %accn")
    e.raw(f"  %sc = alloca float, i64 {R * KB}\n  %mx = alloca float, i64 {R}\n  %sm = alloca float, i64 {R}")
    e.raw("  %none = icmp sge i64 %r0, %r1\n  br i1 %none, label %exit, label %tile")
    # ---- a tile of R rows: their pointers, and a fresh online-softmax state
    e.raw("tile:\n  %t = phi i64 [%r0, %entry], [%t.next, %tile.done]")
    q, o, m = [], [], []
    for r in range(R):
        row = e.op(f"add i64 %t, {r}")
        desc = e.op(f"getelementptr i64, ptr %table, i64 {e.op(f'mul i64 {row}, 3')}")
        q.append(e.op(f"load ptr, ptr {desc}"))
        o.append(e.op(f"load ptr, ptr {e.op(f'getelementptr i64, ptr {desc}, i64 1')}"))
        m.append(e.op(f"load ptr, ptr {e.op(f'getelementptr i64, ptr {desc}, i64 2')}"))
        e.raw(f"  store float 0xFFF0000000000000, ptr {e.op(f'getelementptr float, ptr %mx, i64 {r}')}")
        e.raw(f"  store float 0.0, ptr {e.op(f'getelementptr float, ptr %sm, i64 {r}')}")
    _loop(e, "zero", "0", "%accn", lambda i: e.raw(f"  store float 0.0, ptr {_at(e, '%acc', i)}"))
    e.raw("  br label %block")
    # ---- a block of keys
    e.raw("block:\n  %j0 = phi i64 [0, %zero.done], [%j0.next, %update.done]")
    left = e.op("sub i64 %S, %j0")
    e.raw(f"  %jn = call i64 @llvm.smin.i64(i64 {left}, i64 {KB})")

    def score(jj):  # the scores of key j0 + jj for every row of the tile, -inf where masked
        key = e.op(f"add i64 %j0, {jj}")
        seen = []
        for r in range(R):
            if mask_kind == "bool":
                at = e.op(f"getelementptr i8, ptr {m[r]}, i64 {e.op(f'mul i64 {key}, %mstride')}")
                seen.append(e.op(f"icmp ne i8 {e.op(f'load i8, ptr {at}')}, 0"))
            else:
                seen.append("true")
        anyseen = seen[0]
        for s in seen[1:]:
            anyseen = e.op(f"or i1 {anyseen}, {s}")
        label = e.tmp()[1:]
        here = e.tmp()[1:]
        e.raw(f"  br label %{here}\n{here}:")
        e.raw(f"  br i1 {anyseen}, label %{label}.dot, label %{label}.skip")
        e.raw(f"{label}.dot:")
        krow = e.op(f"mul i64 {key}, %ldk")
        sums = _dot_rows(e, label, q, krow)
        e.raw(f"  br label %{label}.skip\n{label}.skip:")
        dots = [e.op(f"phi float [{sums[r]}, %{label}.dot.done], [0.0, %{here}]") for r in range(R)]
        for r in range(R):
            s = e.op(f"fmul float {dots[r]}, {float_literal(scale)}")
            if mask_kind == "add":
                at = e.op(f"getelementptr float, ptr {m[r]}, i64 {e.op(f'mul i64 {key}, %mstride')}")
                s = e.op(f"fadd float {s}, {e.op(f'load float, ptr {at}')}")
            s = e.op(f"select i1 {seen[r]}, float {s}, float 0xFFF0000000000000")
            e.raw(f"  store float {s}, ptr {_at(e, '%sc', e.op(f'add i64 {jj}, {r * KB}'))}")

    _loop(e, "scores", "0", "%jn", score)
    e.raw("  br label %update")
    # ---- fold the block into each row's running max, sum and accumulator
    e.raw("update:")
    corr = []
    for r in range(R):
        mxp = e.op(f"getelementptr float, ptr %mx, i64 {r}")
        old = e.op(f"load float, ptr {mxp}")
        peak = _reduce_scores(e, f"peak{r}", r * KB, old)
        dead = e.op(f"fcmp oeq float {peak}, 0xFFF0000000000000")  # nothing seen yet: keep zeros
        c = e.exp(e.op(f"fsub float {old}, {peak}"))
        corr.append(e.op(f"select i1 {dead}, float 1.0, float {c}"))
        total = _exp_scores(e, f"exp{r}", r * KB, peak, dead)
        smp = e.op(f"getelementptr float, ptr %sm, i64 {r}")
        kept = e.op(f"fmul float {e.op(f'load float, ptr {smp}')}, {corr[r]}")
        e.raw(f"  store float {e.op(f'fadd float {kept}, {total}')}, ptr {smp}")
        e.raw(f"  store float {peak}, ptr {mxp}")

    def acc_at(x, r):  # row r's accumulator, element x
        return _at(e, "%acc", e.op(f"add i64 {x}, {e.op(f'mul i64 %DV, {r}')}"))

    def rescale(x):
        for r in range(R):
            at = acc_at(x, r)
            old = e.op(f"load float, ptr {at}")
            e.raw(f"  store float {e.op(f'fmul float {old}, {corr[r]}')}, ptr {at}")

    _loop(e, "rescale", "0", "%DV", rescale)

    def accumulate(jj):
        ps = [e.op(f"load float, ptr {_at(e, '%sc', e.op(f'add i64 {jj}, {r * KB}'))}") for r in range(R)]
        vrow = e.op(f"mul i64 {e.op(f'add i64 %j0, {jj}')}, %ldv")
        anyp = e.op(f"fcmp une float {ps[0]}, 0.0")
        for p in ps[1:]:
            anyp = e.op(f"or i1 {anyp}, {e.op(f'fcmp une float {p}, 0.0')}")
        label = e.tmp()[1:]
        e.raw(f"  br i1 {anyp}, label %{label}.pre, label %{label}.done")
        e.raw(f"{label}.pre:\n  br label %{label}")

        def axpy(x):
            v = e.op(f"load float, ptr {_at(e, '%V', e.op(f'add i64 {vrow}, {x}'))}")
            for r in range(R):
                at = acc_at(x, r)
                old, product = e.op(f"load float, ptr {at}"), e.op(f"fmul contract float {ps[r]}, {v}")
                e.raw(f"  store float {e.op(f'fadd contract float {old}, {product}')}, ptr {at}")
        _loop(e, label, "0", "%DV", axpy, entered=True)

    _loop(e, "accumulate", "0", "%jn", accumulate)
    e.raw(f"  br label %update.done\nupdate.done:\n  %j0.next = add i64 %j0, {KB}")
    e.raw("  %more = icmp slt i64 %j0.next, %S\n  br i1 %more, label %block, label %finish")
    # ---- out = acc / sum
    e.raw("finish:")
    sums = [e.op(f"load float, ptr {_at(e, '%sm', r)}") for r in range(R)]

    def write(x):
        for r in range(R):
            a = e.op(f"load float, ptr {acc_at(x, r)}")
            e.raw(f"  store float {e.op(f'fdiv float {a}, {sums[r]}')}, ptr {_at(e, o[r], x)}")

    _loop(e, "write", "0", "%DV", write)
    e.raw(f"  br label %tile.done\ntile.done:\n  %t.next = add i64 %t, {R}")
    e.raw("  %t.more = icmp slt i64 %t.next, %r1\n  br i1 %t.more, label %tile, label %exit")
    e.raw("exit:\n  ret void\n}")
    return DECLARATIONS + "\n".join(e.lines) + "\n"


def _loop(e, label, lo, hi, body, entered=False):
    """for i in lo..hi: body(i), as blocks label / label.done; falls through into label.done.
    The caller has branched to `label` already when `entered`, else this emits the branch."""
    if not entered:
        e.raw(f"  br label %{label}.pre\n{label}.pre:")
        e.raw(f"  %{label}.empty = icmp sge i64 {lo}, {hi}")
        e.raw(f"  br i1 %{label}.empty, label %{label}.done, label %{label}")
    e.raw(f"{label}:\n  %{label}.i = phi i64 [{lo}, %{label}.pre], [%{label}.next, %{label}.latch]")
    body(f"%{label}.i")
    e.raw(f"  br label %{label}.latch\n{label}.latch:\n  %{label}.next = add i64 %{label}.i, 1")
    e.raw(f"  %{label}.more = icmp slt i64 %{label}.next, {hi}")
    e.raw(f"  br i1 %{label}.more, label %{label}, label %{label}.done")
    e.raw(f"{label}.done:")


def _dot_rows(e, label, q, krow) -> list[str]:
    """sum_d q[r][d] * K[krow + d] for every row r: one pass over the k row, R accumulators."""
    R = len(q)
    e.raw(f"  br label %{label}.dot.loop\n{label}.dot.loop:")
    e.raw(f"  %{label}.d = phi i64 [0, %{label}.dot], [%{label}.d.next, %{label}.dot.loop]")
    for r in range(R):
        e.raw(f"  %{label}.s{r} = phi float [0.0, %{label}.dot], [%{label}.s{r}.next, %{label}.dot.loop]")
    k = e.op(f"load float, ptr {_at(e, '%K', e.op(f'add i64 {krow}, %{label}.d'))}")
    sums = []
    for r in range(R):
        qv = e.op(f"load float, ptr {e.op(f'getelementptr float, ptr {q[r]}, i64 %{label}.d')}")
        product = e.op(f"fmul contract float {qv}, {k}")
        e.raw(f"  %{label}.s{r}.next = fadd reassoc contract float %{label}.s{r}, {product}")
        sums.append(f"%{label}.s{r}.next")
    e.raw(f"  %{label}.d.next = add i64 %{label}.d, 1\n  %{label}.d.more = icmp slt i64 %{label}.d.next, %D")
    e.raw(f"  br i1 %{label}.d.more, label %{label}.dot.loop, label %{label}.dot.done\n{label}.dot.done:")
    return sums


def _fold_scores(e, label, base, start, step) -> str:
    """Fold the block's scores scores[base : base + jn] into a running value from `start`:
    step(value, address of the score) -> the next value. Returns the final value."""
    e.raw(f"  br label %{label}.pre\n{label}.pre:\n  br label %{label}\n{label}:")
    e.raw(f"  %{label}.i = phi i64 [0, %{label}.pre], [%{label}.next, %{label}]")
    e.raw(f"  %{label}.v = phi float [{start}, %{label}.pre], [%{label}.v.next, %{label}]")
    value = step(f"%{label}.v", _at(e, "%sc", e.op(f"add i64 %{label}.i, {base}")))
    e.raw(f"  %{label}.v.next = {value}")
    e.raw(f"  %{label}.next = add i64 %{label}.i, 1\n  %{label}.more = icmp slt i64 %{label}.next, %jn")
    e.raw(f"  br i1 %{label}.more, label %{label}, label %{label}.done\n{label}.done:")
    return f"%{label}.v.next"


def _reduce_scores(e, label, base, start) -> str:
    """max(start, scores[base : base + jn])."""
    return _fold_scores(e, label, base, start, lambda m, at: (
        f"call float @llvm.maximum.f32(float {m}, float {e.op(f'load float, ptr {at}')})"))


def _exp_scores(e, label, base, peak, dead) -> str:
    """scores[i] = exp(scores[i] - peak) (0 for a row that has seen nothing) over the block;
    returns their sum."""
    def step(total, at):
        p = e.exp(e.op(f"fsub float {e.op(f'load float, ptr {at}')}, {peak}"))
        p = e.op(f"select i1 {dead}, float 0.0, float {p}")
        e.raw(f"  store float {p}, ptr {at}")
        return f"fadd reassoc float {total}, {p}"
    return _fold_scores(e, label, base, "0.0", step)


def _at(e, ptr, index) -> str:
    return e.op(f"getelementptr float, ptr {ptr}, i64 {index}")
