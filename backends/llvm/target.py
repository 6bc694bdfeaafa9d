"""What the LLVM lowering compiles for: a triple, a CPU name and its features. The host is the
default; any other target (aarch64 NEON, x86-64 with or without AVX-512) only changes these
three strings, which is what makes the backend retargetable."""
import ctypes
import os
import sys
from dataclasses import dataclass, replace
from functools import lru_cache

import llvmlite.binding as llvm


@dataclass(frozen=True)
class Target:
    triple: str
    cpu: str
    features: str

    @property
    def arch(self) -> str:
        return self.triple.split("-")[0]


@lru_cache(maxsize=1)
def _init():
    llvm.initialize_all_targets()      # every architecture, so foreign targets can emit assembly
    llvm.initialize_all_asmprinters()
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()


@lru_cache(maxsize=1)
def host() -> Target:
    """What kernels are compiled for on this machine: the CPU as it is (TT_TARGET unset, empty
    or `native`), or one of LEVELS that it supports, so that, say, the AVX2 kernels can be run
    and tested on an AVX-512 machine."""
    name = os.environ.get("TT_TARGET", "").strip().lower() or "native"
    if name == "native":
        return _native()
    if name not in LEVELS:
        raise ValueError(f"TT_TARGET={name!r}: give native or one of {', '.join(LEVELS)}")
    missing = _missing(name)
    if missing:
        raise ValueError(f"TT_TARGET={name}: this CPU ({_native().cpu}) lacks {', '.join(missing)}: "
                         f"choose a level it has ({', '.join(levels_here()) or 'none'}), or unset TT_TARGET")
    return replace(LEVELS[name], triple=_native().triple)


def levels_here() -> list[str]:
    """The TT_TARGET levels this CPU runs, one name per distinct target."""
    names = {}
    for name, level in LEVELS.items():
        if not _missing(name):
            names.setdefault(level, name)
    return list(names.values())


def _missing(name: str) -> list[str]:
    """What this CPU lacks of level `name` (its architecture, or features)."""
    native, level = _native(), LEVELS[name]
    if level.arch != native.arch:
        return [level.arch]
    return [f[1:] for f in level.features.split(",") if f.startswith("+") and f not in native.features.split(",")]


@lru_cache(maxsize=1)
def _native() -> Target:
    """This CPU, with its real name and features: without them LLVM assumes a generic x86-64
    and loses AVX2 and FMA."""
    _init()
    features = llvm.get_host_cpu_features().flatten()
    if "+avx512f" in features.split(","):
        # LLVM tunes every AVX-512 Intel CPU to prefer 256-bit vectors (zmm once lowered the
        # clock) and then splits even our explicit 16-lane vectors in two: with zmm the q4_k and
        # q6_k prefill kernels measured 1.9x faster (189 -> 366, 108 -> 208 GFLOP/s)
        features += ",-prefer-256-bit"
    triple = llvm.get_process_triple()
    if triple.startswith("aarch64") and sys.platform == "linux":
        features = _with_hwcaps(features)
    return Target(triple, llvm.get_host_cpu_name(), features)


# the Linux kernel's AT_HWCAP bits for what the kernels use: it knows the CPU where LLVM's reading
# of /proc/cpuinfo does not (under qemu-user, /proc/cpuinfo is the host's)
HWCAPS = {1 << 0: "+fp-armv8", 1 << 1: "+neon", 1 << 9: "+fullfp16", 1 << 20: "+dotprod"}


def _with_hwcaps(features: str) -> str:
    libc = ctypes.CDLL(None)
    libc.getauxval.restype, libc.getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    bits = libc.getauxval(16)  # AT_HWCAP
    listed = [f for f in features.split(",") if f]
    for bit, feature in HWCAPS.items():
        if bits & bit:
            listed = [f for f in listed if f != "-" + feature[1:]] + ([feature] if feature not in listed else [])
    return ",".join(listed)


def vector_registers(target: Target | None = None) -> int:
    """How many vector registers the kernels may keep values in: 32 with AVX-512 or on aarch64,
    16 with AVX2 (matmul tiles are sized to fit them)."""
    target = target or host()
    return 32 if target.arch == "aarch64" or "+avx512f" in target.features.split(",") else 16


def float_lanes(target: Target | None = None) -> int:
    """The lanes of partial sums each float product keeps, one fixed order per target
    (codegen._float_blocks, attention's dots): a vector register's floats on x86 (16 with AVX-512, 8
    with AVX2), two NEON registers' on aarch64 (8), so that each sum has two chains of fused
    multiply-adds in flight there too."""
    target = target or host()
    return 16 if "+avx512f" in target.features.split(",") else 8


X86_64_AVX2 = Target("x86_64-unknown-linux-gnu", "haswell", "+avx,+avx2,+fma,+f16c")
# skylake-avx512 prefers 256-bit vectors by default (512-bit ones lower its clock); ask for zmm
X86_64_AVX512 = Target("x86_64-unknown-linux-gnu", "skylake-avx512",
                       "+avx,+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512vl,-prefer-256-bit")
# with VNNI, byte dot products are one instruction (vpdpbusd) instead of two
X86_64_AVX512_VNNI = Target("x86_64-unknown-linux-gnu", "icelake-server",
                            "+avx,+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512vl,+avx512vnni")
AARCH64_NEON = Target("aarch64-unknown-linux-gnu", "generic", "+neon,+fp-armv8,+fullfp16")
# Armv8.2's dotprod (Graviton2, Apple M1, Ampere Altra and later): sdot for the byte dot products
AARCH64_DOTPROD = Target("aarch64-unknown-linux-gnu", "generic", "+neon,+fp-armv8,+fullfp16,+dotprod")
# TT_TARGET's names: the feature levels the kernels are written for
LEVELS = {"avx2": X86_64_AVX2, "x86-64-v3": X86_64_AVX2, "avx512": X86_64_AVX512, "avx512-vnni": X86_64_AVX512_VNNI,
          "neon": AARCH64_NEON, "dotprod": AARCH64_DOTPROD}


@lru_cache(maxsize=None)
def machine(target: Target):
    _init()
    return llvm.Target.from_triple(target.triple).create_target_machine(
        cpu=target.cpu, features=target.features, opt=3, codemodel="jitdefault", jit=target == host())


def optimize(ir: str, target: Target):
    """Parse and optimise a module with the new pass manager, loop and SLP vectorisers on."""
    tm = machine(target)
    module = llvm.parse_assembly(ir)
    module.triple, module.data_layout = target.triple, str(tm.target_data)
    module.verify()
    options = llvm.create_pipeline_tuning_options(speed_level=3)
    options.loop_vectorization = True
    options.slp_vectorization = True
    options.loop_unrolling = True
    builder = llvm.create_pass_builder(tm, options)
    builder.getModulePassManager().run(module, builder)
    return module


def assembly(ir: str, target: Target) -> str:
    """The machine code a module becomes on `target`, as text (no need to run it)."""
    return machine(target).emit_assembly(optimize(ir, target))
