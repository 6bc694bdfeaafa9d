"""The kernel-building layer: a kernel is written as the loop nest it is, and this module turns
that into LLVM IR's blocks, branches and phis. No kernel writes a phi or a branch itself.

    k = Kernel(name, signature)
    with k.loop("0", "%N") as i:           # for i in range(0, N)
        total = k.carry("0.0")             # a value carried around the loop (it owns its phis)
        total.set(k.op(f"fadd reassoc float {total.value}, {k.load_at('%x', i, F32)}"))
    k.store(total.final, "%out", F32)      # its value after the loop (the start when N <= 0)
    ir = k.finish()

`k.when(cond)` is an `if` without `else`; a value made inside reaches the code after it through
`branch.join(inside, otherwise)`. Everything straight-line (loads that widen half types, stores
that round, the instructions of a fused program) is the Emitter's, which Kernel extends.
"""
from contextlib import contextmanager
from dataclasses import dataclass, field

from backends.llvm.emitter import DECLARATIONS, STORAGE, Emitter, constant
from ops import dtypes


@dataclass
class Carried:
    """A loop-carried value: `value` at the top of the loop body, `set(next)` in it (again to
    update it: `current` is the latest), `final` after the loop."""
    type: str
    init: str
    value: str
    final: str
    next: str | None = None

    def set(self, value: str):
        self.next = value

    @property
    def current(self) -> str:
        return self.next or self.value


@dataclass
class _Loop:
    label: str
    phis: list = field(default_factory=list)  # the header's carried phis, written at close
    carried: list = field(default_factory=list)


@dataclass
class Branch:
    label: str
    phis: list = field(default_factory=list)  # the join block's phis
    n: int = 0

    def join(self, inside: str, otherwise: str, type: str = "float") -> str:
        """The value after the branch: `inside` when the condition held, else `otherwise`."""
        self.n += 1
        name = f"%{self.label}.v{self.n}"
        self.phis.append(f"  {name} = phi {type} [{inside}, %{self.label}.end], [{otherwise}, %{self.label}.test]")
        return name


class Kernel(Emitter):
    def __init__(self, name: str, signature):
        super().__init__()
        self.raw(signature.header(name))
        self.raw("entry:")
        self._loops: list[_Loop] = []
        self._labels = 0
        self._in_entry = True

    def _label(self, hint: str) -> str:
        self._labels += 1
        self._in_entry = False
        return f"{hint}.{self._labels}"  # a dot: no argument or temporary has one

    # ---- index arithmetic and addresses ---------------------------------------------------------
    def add(self, a, b) -> str:
        return self.op(f"add i64 {a}, {b}")

    def mul(self, a, b) -> str:
        return self.op(f"mul i64 {a}, {b}")

    def at(self, ptr: str, index, storage: str = "float") -> str:
        """The address of element `index` of an array of `storage` (an LLVM type)."""
        return self.op(f"getelementptr {storage}, ptr {ptr}, i64 {index}")

    def load_at(self, ptr: str, index, d) -> str:
        """Element `index` of an array of dtype d, widened to its compute type."""
        return self.load(self.at(ptr, index, STORAGE[d.name]), d)

    def store_at(self, value: str, ptr: str, index, d):
        self.store(value, self.at(ptr, index, STORAGE[d.name]), d)

    # ---- vectors --------------------------------------------------------------------------------
    def vload(self, ptr: str, n: int, element: str, align: int = 1) -> str:
        """<n x element> from ptr (unaligned unless told)."""
        return self.op(f"load <{n} x {element}>, ptr {ptr}, align {align}")

    def splat(self, x: str, n: int, element: str = "float") -> str:
        one = self.op(f"insertelement <{n} x {element}> poison, {element} {x}, i32 0")
        return self.op(f"shufflevector <{n} x {element}> {one}, <{n} x {element}> poison, <{n} x i32> zeroinitializer")

    def halves(self, v: str, n: int, element: str = "float") -> tuple[str, str]:
        """The two halves of an <n x element> vector."""
        lanes = lambda lo: ", ".join(f"i32 {i}" for i in range(lo, lo + n // 2))  # noqa: E731
        return tuple(self.op(f"shufflevector <{n} x {element}> {v}, <{n} x {element}> poison, <{n // 2} x i32> <{lanes(lo)}>")
                     for lo in (0, n // 2))

    def concat(self, a: str, b: str, n: int, element: str) -> str:
        """<2n x element> from two <n x element> vectors."""
        lanes = ", ".join(f"i32 {i}" for i in range(2 * n))
        return self.op(f"shufflevector <{n} x {element}> {a}, <{n} x {element}> {b}, <{2 * n} x i32> <{lanes}>")

    def tree_sum(self, v: str, n: int) -> str:
        """The sum of a float vector's lanes in one fixed order: halves added until one lane
        remains (no reassociation: the same bits wherever it runs)."""
        while n > 1:
            lo, hi = self.halves(v, n)
            n //= 2
            v = self.op(f"fadd <{n} x float> {lo}, {hi}")
        return self.op(f"extractelement <1 x float> {v}, i32 0")

    def hsum(self, v: str, n: int) -> str:
        """The sum of a float vector's lanes, in any order."""
        return self.op(f"call reassoc float @llvm.vector.reduce.fadd.v{n}f32(float -0.0, <{n} x float> {v})")

    def vload_floats(self, ptr: str, n: int, d) -> str:
        """<n x float> from n elements of a float type at ptr."""
        v = self.vload(ptr, n, STORAGE[d.name])
        if d == dtypes.float16:
            return self.op(f"fpext <{n} x half> {v} to <{n} x float>")
        if d == dtypes.bfloat16:
            wide = self.op(f"zext <{n} x i16> {v} to <{n} x i32>")
            shifted = self.op(f"shl <{n} x i32> {wide}, {constant(16, n, 'i32')}")
            return self.op(f"bitcast <{n} x i32> {shifted} to <{n} x float>")
        assert d == dtypes.float32, d
        return v

    def prefetch(self, ptr: str):
        """Ask for the cache line at ptr to be read (a hint: it never faults)."""
        self.raw(f"  call void @llvm.prefetch.p0(ptr {ptr}, i32 0, i32 3, i32 1)")

    def scratch(self, storage: str, count) -> str:
        """A stack array for the whole call; only at the start, before any loop or branch."""
        assert self._in_entry, "scratch arrays are made in the entry block"
        return self.op(f"alloca {storage}, i64 {count}")

    # ---- control flow ---------------------------------------------------------------------------
    @contextmanager
    def loop(self, lo, hi, step=1, hint: str = "i", nonempty: bool = False):
        """for i in range(lo, hi, step): yields i. `nonempty` when the caller knows lo < hi, which
        saves the test on entry."""
        L = _Loop(self._label(hint))
        name = L.label
        self.raw(f"  br label %{name}.pre\n{name}.pre:")
        if nonempty:
            self.raw(f"  br label %{name}")
        else:
            self.raw(f"  %{name}.empty = icmp sge i64 {lo}, {hi}")
            self.raw(f"  br i1 %{name}.empty, label %{name}.done, label %{name}")
        self.raw(f"{name}:\n  %{name}.i = phi i64 [{lo}, %{name}.pre], [%{name}.next, %{name}.latch]")
        self.lines.append(L.phis)
        self._loops.append(L)
        yield f"%{name}.i"
        self._loops.pop()
        self.raw(f"  br label %{name}.latch\n{name}.latch:")
        self.raw(f"  %{name}.next = add i64 %{name}.i, {step}\n  %{name}.more = icmp slt i64 %{name}.next, {hi}")
        self.raw(f"  br i1 %{name}.more, label %{name}, label %{name}.done\n{name}.done:")
        for c in L.carried:
            assert c.next is not None, f"{c.value} was carried but never set"
            L.phis.append(f"  {c.value} = phi {c.type} [{c.init}, %{name}.pre], [{c.next}, %{name}.latch]")
            start = "" if nonempty else f"[{c.init}, %{name}.pre], "
            self.raw(f"  {c.final} = phi {c.type} {start}[{c.next}, %{name}.latch]")

    def carry(self, init: str, type: str = "float") -> Carried:
        """A value carried around the innermost open loop, starting at `init`."""
        c = Carried(type, init, self.tmp(), self.tmp())
        self._loops[-1].carried.append(c)
        return c

    @contextmanager
    def when(self, cond: str, hint: str = "if"):
        """if cond: ...; yields the Branch whose join() brings values out."""
        b = Branch(self._label(hint))
        self.raw(f"  br label %{b.label}.test\n{b.label}.test:")
        self.raw(f"  br i1 {cond}, label %{b.label}.then, label %{b.label}.join\n{b.label}.then:")
        yield b
        self.raw(f"  br label %{b.label}.end\n{b.label}.end:\n  br label %{b.label}.join\n{b.label}.join:")
        self.lines.append(b.phis)

    def finish(self) -> str:
        """The module's text: the intrinsics' declarations and this kernel."""
        body = []
        for line in self.lines:
            body.extend(line if isinstance(line, list) else [line])
        return DECLARATIONS + "\n".join(body) + "\n  ret void\n}\n"
