"""The LLVM lowering is retargetable: the same kernels emit vector code for other CPUs by
changing only the target (triple, CPU, features); nothing is run there."""
import pytest

from backends.llvm import codegen
from backends.llvm.target import AARCH64_NEON, X86_64_AVX2, X86_64_AVX512, X86_64_AVX512_VNNI, assembly, host
from ops import dtypes

F32, BF16 = dtypes.float32, dtypes.bfloat16
KERNELS = {
    "matvec": lambda: codegen.matmul_nt_kernel("k", F32, (F32,), F32, 1, 4),
    "matvec-bf16": lambda: codegen.matmul_nt_kernel("k", F32, (BF16,), F32, 1, 4),
    "matmul": lambda: codegen.matmul_nt_kernel("k", F32, (F32,), F32, 4, 3),
    "fused-mul-add": lambda: codegen.elementwise_kernel(
        "k", (("mul", None, (0, 1), F32), ("add", None, (2, 1), F32)), [F32, F32], F32, 1, (1, 1, 1)),
}
EXPECTED = [  # (target, what its assembly must contain)
    (X86_64_AVX2, ("vfmadd", "ymm")),
    (X86_64_AVX512, ("vfmadd", "zmm")),
    (AARCH64_NEON, ("fmla", "v0.4s")),
]


@pytest.mark.parametrize("kernel", ["matvec", "matvec-bf16", "matmul"])
@pytest.mark.parametrize("target, expected", EXPECTED, ids=["x86-avx2", "x86-avx512", "aarch64-neon"])
def test_matmul_kernels_use_fused_multiply_add_vectors(kernel, target, expected):
    asm = assembly(KERNELS[kernel](), target)
    for needle in expected:
        assert needle in asm, f"{needle} missing for {target.cpu}"


@pytest.mark.parametrize("target, register", [(X86_64_AVX2, "ymm"), (X86_64_AVX512, "zmm"), (AARCH64_NEON, ".4s")],
                         ids=["x86-avx2", "x86-avx512", "aarch64-neon"])
def test_elementwise_kernels_vectorise(target, register):
    assert register in assembly(KERNELS["fused-mul-add"](), target)


@pytest.mark.parametrize("target, instructions", [
    (X86_64_AVX2, ("vpmaddubsw", "vpmaddwd")),
    (X86_64_AVX512_VNNI, ("vpdpbusd",)),
    (AARCH64_NEON, ("smull", "addp")),  # widening multiplies, pairwise adds (sdot needs +dotprod)
], ids=["x86-avx2", "x86-vnni", "aarch64-neon"])
def test_block_products_use_integer_dot_products(target, instructions):
    """q4_0 weights meet 8-bit activations in the target's byte dot product (blocks.dot)."""
    asm = assembly(codegen.matmul_nt_kernel("k", F32, (dtypes.q4_0,), F32, 1, 1, target=target), target)
    for needle in instructions:
        assert needle in asm, f"{needle} missing for {target.cpu}"


def test_without_avx512_no_zmm():
    assert "zmm" not in assembly(KERNELS["matmul"](), X86_64_AVX2)


def test_the_host_target_names_the_real_cpu():
    t = host()
    assert t.cpu not in ("", "generic") and t.features
    if t.arch == "x86_64":
        assert "+avx2" in t.features.split(",") or "-avx2" in t.features.split(",")


def test_a_second_process_reuses_compiled_kernels_from_disk(tmp_path):
    import subprocess
    import sys
    script = ("import backends; backends.use('llvm'); from tinytensor import Tensor; "
              "print((Tensor.randn(33, seed=1).exp() * 3).sum().item())")
    env = {**__import__("os").environ, "TT_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    objects = sorted(p.name for p in tmp_path.rglob("*.o"))
    assert objects, "no object code was cached"
    second = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert sorted(p.name for p in tmp_path.rglob("*.o")) == objects  # nothing compiled again
    assert first.stdout == second.stdout
