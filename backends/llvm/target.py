"""What the LLVM lowering compiles for: a triple, a CPU name and its features. The host is the
default; any other target (aarch64 NEON, x86-64 with or without AVX-512) only changes these
three strings, which is what makes the backend retargetable."""
import os
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
    """What kernels are compiled for on this machine: the CPU as it is (TT_TARGET unset or
    `native`), or one of LEVELS that it supports, so that, say, the AVX2 kernels can be run
    and tested on an AVX-512 machine."""
    native = _native()
    name = os.environ.get("TT_TARGET", "native").strip().lower()
    if name == "native":
        return native
    if name not in LEVELS:
        raise ValueError(f"TT_TARGET={name!r}: give native or one of {', '.join(LEVELS)}")
    level = LEVELS[name]
    missing = [f[1:] for f in level.features.split(",") if f.startswith("+") and f not in native.features.split(",")]
    if level.arch != native.arch or missing:
        raise ValueError(f"TT_TARGET={name}: this CPU ({native.cpu}) lacks {', '.join(missing) or level.arch}: "
                         f"choose a level it has, or unset TT_TARGET")
    return replace(level, triple=native.triple)


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
    return Target(llvm.get_process_triple(), llvm.get_host_cpu_name(), features)


def vector_registers(target: Target | None = None) -> int:
    """How many vector registers the kernels may keep values in: 32 with AVX-512 or on aarch64,
    16 with AVX2 (matmul tiles are sized to fit them)."""
    target = target or host()
    return 32 if target.arch == "aarch64" or "+avx512f" in target.features.split(",") else 16


X86_64_AVX2 = Target("x86_64-unknown-linux-gnu", "haswell", "+avx,+avx2,+fma,+f16c")
# skylake-avx512 prefers 256-bit vectors by default (512-bit ones lower its clock); ask for zmm
X86_64_AVX512 = Target("x86_64-unknown-linux-gnu", "skylake-avx512",
                       "+avx,+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512vl,-prefer-256-bit")
# with VNNI, byte dot products are one instruction (vpdpbusd) instead of two
X86_64_AVX512_VNNI = Target("x86_64-unknown-linux-gnu", "icelake-server",
                            "+avx,+avx2,+fma,+f16c,+avx512f,+avx512bw,+avx512vl,+avx512vnni")
AARCH64_NEON = Target("aarch64-unknown-linux-gnu", "cortex-a76", "+neon,+fp-armv8,+fullfp16")
# TT_TARGET's names: the x86-64 feature levels the kernels are written for
LEVELS = {"avx2": X86_64_AVX2, "x86-64-v3": X86_64_AVX2, "avx512": X86_64_AVX512, "avx512-vnni": X86_64_AVX512_VNNI}


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
